"""The lineage: the pretraining a checkpoint descends from, which the scaling law needs.

Theorem 3 predicts a tuned model's bound from the base and length it was *pretrained* with (the
pretraining base and T_train, eq. 13) and the length it was tuned at (T_tune, eqs. 16a, 16c, 16d).
The weights do not show them, and config.json often hides them (a model pretrained at 2K with base
10000, then extended to 8K with base 1e5, shows only the latter), so every checkpoint records them
in its metadata, ``meta["lineage"]``:

    {"pretrain_base": 500000.0, "pretrain_len": 8192, "tune_len": 8192,
     "sources": {"pretrain_base": "config.json rope_theta", ...}}

``convert`` writes it from config.json or from the user's flags; ``train`` carries init.from's forward,
with its own train.seq_len as the tune length. Checkpoints written before lineages existed get the one
their metadata implies (lineage_of). Nothing here imports torch: the planner reads it instantly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megarope import scaling

FIELDS = ("pretrain_base", "pretrain_len", "tune_len")


@dataclass(frozen=True)
class Lineage:
    """pretrain_base, pretrain_len: the RoPE base and length of pretraining (the paper's 10000 and T_train).
    tune_len: the length of the latest (continued) training, T_tune.
    sources: where each number came from, in words (for the user: config.json keys, flags, defaults)."""

    pretrain_base: float
    pretrain_len: int
    tune_len: int
    sources: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.pretrain_base > 1:
            raise ValueError(f"pretraining base must be > 1, got {self.pretrain_base:g}")
        for name in ("pretrain_len", "tune_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def effective_tune_len(self) -> int:
        """T_tune for the law: a model tuned shorter than it was pretrained has still seen pretrain_len."""
        return max(self.tune_len, self.pretrain_len)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line per number, with where it came from."""
        lines = [f"{name.replace('_', ' ')} {getattr(self, name):,.6g}"
                 + (f"  ({self.sources[name]})" if name in self.sources else "") for name in FIELDS]
        if self.tune_len < self.pretrain_len:
            lines[-1] += f"; the law takes {self.pretrain_len:,}, the longer length the model has seen"
        return "\n".join(lines)


def from_hf_config(cfg: dict, pretrain_base: float | None = None, pretrain_len: int | None = None,
                   tune_len: int | None = None, given_as: str = "--{flag}") -> Lineage:
    """The lineage config.json states, each number replaced by the caller's where given.

    ``given_as`` says where a given number came from: a format with {flag} (pretrain-base) and {name}
    (pretrain_base), "--{flag}" for convert's flags.

    Pretraining base: rope_theta (top level or in rope_parameters), transformers' default 10000 without one.
    Pretraining length: original_max_position_embeddings (in the RoPE scaling parameters, or at the top
    level) where there is one, else max_position_embeddings. Tune length: max_position_embeddings.
    """
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    found = {}
    if "rope_theta" in params:
        found["pretrain_base"] = (float(params["rope_theta"]), "config.json rope_parameters.rope_theta")
    elif "rope_theta" in cfg:
        found["pretrain_base"] = (float(cfg["rope_theta"]), "config.json rope_theta")
    else:
        found["pretrain_base"] = (10000.0, "transformers' default rope_theta 10000 (none in config.json)")
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    if params.get("original_max_position_embeddings"):
        found["pretrain_len"] = (int(params["original_max_position_embeddings"]),
                                 f"config.json {key}.original_max_position_embeddings")
    elif cfg.get("original_max_position_embeddings"):
        found["pretrain_len"] = (int(cfg["original_max_position_embeddings"]),
                                 "config.json original_max_position_embeddings")
    else:
        found["pretrain_len"] = (int(cfg["max_position_embeddings"]), "config.json max_position_embeddings")
    found["tune_len"] = (int(cfg["max_position_embeddings"]), "config.json max_position_embeddings")
    flags = {"pretrain_base": pretrain_base, "pretrain_len": pretrain_len, "tune_len": tune_len}
    for name, value in flags.items():
        if value is not None:
            found[name] = (type(found[name][0])(value), given_as.format(flag=name.replace("_", "-"), name=name))
    return Lineage(**{name: value for name, (value, _) in found.items()},
                   sources={name: source for name, (_, source) in found.items()})


def lineage_of(meta: dict) -> Lineage:
    """A checkpoint's lineage: the recorded one, or for older checkpoints what their metadata implies
    (a converted checkpoint's config.json; else LLaMA's pretraining base 10000, the preset's max_seq_len
    as the pretraining length and the RoPE train_len as the tune length -- what megarope assumed then)."""
    recorded = meta.get("lineage")
    if recorded:
        return Lineage(**{k: recorded[k] for k in FIELDS}, sources=dict(recorded.get("sources") or {}))
    if meta.get("source") == "hf" and meta.get("hf_config"):
        return from_hf_config(meta["hf_config"], meta.get("pretrain_base"), meta.get("pretrain_len"))
    old = "checkpoint without a lineage"
    base = meta.get("pretrain_base")
    length = meta.get("pretrain_len")
    return Lineage(
        pretrain_base=float(base or scaling.LLAMA_PRETRAIN_BASE),
        pretrain_len=int(length or meta["preset"]["max_seq_len"]),
        tune_len=int(meta["rope"]["train_len"]),
        sources={"pretrain_base": f"megarope.json pretrain_base ({old})" if base else
                 f"LLaMA's pretraining base 10000 ({old})",
                 "pretrain_len": f"megarope.json pretrain_len ({old})" if length else
                 f"the preset's max_seq_len ({old})",
                 "tune_len": f"the RoPE train_len ({old})"})


def training_lineage(parent: dict | None, base: float, seq_len: int, documents: bool = False,
                     longest_document: int | None = None) -> Lineage:
    """What a training run records: its parent's (init.from's, or the run it resumes) pretraining carried
    forward with the length it trains at as the tune length; a run from random weights is its own pretraining.

    That length is train.seq_len, unless ``documents`` are packed with positions or attention restarting at
    each one (data.reset_position_ids, data.reset_attention_mask): then no query sees a key farther than its
    document is long, and the run trains at the length of its ``longest_document`` (the longest it has
    trained on, which checkpoints record). Before one is known, train.seq_len stands in, as the bound it is."""
    length, what, source = seq_len, "train.seq_len", "train.seq_len"
    if documents and longest_document:
        length, what = longest_document, "longest document"
        source = f"the longest document trained on (documents packed with restarts; train.seq_len {seq_len})"
    elif documents:
        source = ("train.seq_len, an upper bound: documents are packed with restarts, and each checkpoint records "
                  "the longest one trained on")
    if parent is None:
        this = "this run's"
        return Lineage(pretrain_base=float(base), pretrain_len=length, tune_len=length,
                       sources={"pretrain_base": f"{this} rope.base (trained from random weights)",
                                "pretrain_len": f"{this} {what} (trained from random weights)",
                                "tune_len": source})
    before = lineage_of(parent)
    return Lineage(pretrain_base=before.pretrain_base, pretrain_len=before.pretrain_len, tune_len=length,
                   sources={**before.sources, "tune_len": source})


def rotary_dim_of(meta: dict) -> int:
    """The rotary dimension d of a checkpoint's heads (its kv_channels or hidden/heads, times rotary_percent)."""
    preset = meta["preset"]
    head_dim = preset.get("kv_channels") or preset["hidden_size"] // preset["num_heads"]
    return scaling.rotary_dim(head_dim, float(meta["rope"].get("rotary_percent", 1.0)))


def predicted_bound(meta: dict, base: float) -> tuple[float | None, str | None]:
    """Theorem 3's bound for a checkpoint used at ``base``, from its lineage and rotary dimension:
    (bound in tokens, regime), (None, regime) below beta_3, (None, None) where the law cannot apply."""
    lineage = lineage_of(meta)
    try:
        plan = scaling.plan_base(rotary_dim_of(meta), lineage.pretrain_len, base, lineage.effective_tune_len,
                                 lineage.pretrain_base)
    except ValueError:
        return None, None
    return plan.extrapolation_bound, plan.regime

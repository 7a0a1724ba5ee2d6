"""What `megarope train` checks and decides before it builds anything, in one line each: the accelerator and
dtype, the config against the GPU and the layout, the loss, the model and tokenizer, whether a checkpoint may be
resumed by this run, and `megarope train --dry-run`'s plan.

Every function here reads the config, shapes and small JSON files only: nothing is built, no process group
is needed (check_data, check_resume and check_same_model read a checkpoint's megarope.json and train_state.json).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from megarope import checkpoint, compat, config as configuration, data, parallel
from megarope.errors import UsageError
from megarope.optim import optimizer_kind, reshards_across_model_parallel


# ----------------------------------------------------------------------------------------------- the config
@dataclass(frozen=True)
class Accelerator:
    """The GPU a run trains on, as far as the checks need it."""

    name: str
    capability: tuple[int, int]
    memory_gb: float


def this_accelerator() -> Accelerator | None:
    """The GPU this process trains on, or None on a CPU (also where MEGAROPE_DEVICE=cpu keeps a GPU machine's
    run on the CPU: asked before parallel.init applies that choice)."""
    if not compat.uses_cuda():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return Accelerator(props.name, (props.major, props.minor), props.total_memory / 1e9)


def resolve_dtype(cfg: configuration.Config, gpu: Accelerator | None) -> str:
    """train.dtype, with "auto" made bf16 on GPUs (TE's fused attention needs it) and fp32 on a CPU."""
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "bf16" if gpu is not None else "fp32"


def check_config(cfg: configuration.Config, gpu: Accelerator | None) -> None:
    """What can be checked before starting any process group or reading any file, for ``gpu``
    (None: a CPU)."""
    p, t = cfg.parallel, cfg.train
    if t.seq_len % (2 * p.cp * p.tp):
        raise UsageError(f"train.seq_len {t.seq_len} must be divisible by 2*CP*TP = {2 * p.cp * p.tp}")
    if t.fp8 and cfg.model.backend != "te":
        raise UsageError("train.fp8 needs model.backend: te (Transformer Engine)")
    if (t.fp8 or cfg.model.backend == "te") and gpu is None:
        raise UsageError("model.backend te and train.fp8 need a GPU with Transformer Engine; use model.backend: local")
    if cfg.model.backend == "te" and resolve_dtype(cfg, gpu) == "fp32" and p.cp > 1:
        raise UsageError("model.backend te with train.dtype fp32 has no context-parallel attention in Transformer "
                         "Engine (its fused kernels need bf16); use train.dtype: bf16 with parallel.cp > 1")
    if t.fp8 and t.fp8_recipe == "mxfp8" and gpu is not None and gpu.capability[0] < 10:
        raise UsageError(f"train.fp8_recipe mxfp8 needs a Blackwell GPU (compute capability 10 or newer); "
                         f"{gpu.name} has {gpu.capability[0]}.{gpu.capability[1]}: use tensorwise or delayed")
    if t.exit_at_step is not None and t.exit_at_step > t.steps:
        raise UsageError(f"train.exit_at_step {t.exit_at_step} is past train.steps {t.steps}")
    check_documents(cfg)


def check_documents(cfg: configuration.Config) -> None:
    """What the te backend's THD packing (megarope.packing) cannot do: positions that restart where attention
    does not (TE's THD RoPE restarts both at each document), pipelines (a THD micro batch is one row whose
    length follows its documents under CP; megatron's schedules send fixed shapes between stages), and
    dynamic NTK by each document's length (one RoPE table per micro batch) where it would change a base."""
    d, t = cfg.data, cfg.train
    if cfg.model.backend != "te" or not (d.reset_position_ids or d.reset_attention_mask):
        return
    if d.reset_position_ids != d.reset_attention_mask:
        raise UsageError("model.backend te packs documents as THD, where positions and attention restart together: "
                         "set both data.reset_position_ids and data.reset_attention_mask, or use model.backend local")
    if cfg.parallel.pp > 1:
        raise UsageError("model.backend te packs documents as THD, which megatron's pipeline schedules do not send "
                         "between stages here: use parallel.pp 1, or model.backend local")
    train_len = cfg.rope_config()["train_len"]
    if cfg.rope.dynamic_ntk and train_len < t.seq_len:
        raise UsageError(f"model.backend te applies one RoPE table to a micro batch of packed documents, so "
                         f"dynamic NTK cannot take each document's own length (rope.train_len {train_len} < "
                         f"train.seq_len {t.seq_len}); use model.backend local")


def check_layout(cfg: configuration.Config, preset, layout: parallel.Layout) -> None:
    """The checks that need the model's shape and the data-parallel size, before building anything."""
    from megarope.model import pipeline_split

    p, t = cfg.parallel, cfg.train
    try:
        pipeline_split(preset.num_layers, p.pp, p.vpp)
    except ValueError as e:
        raise UsageError(f"parallel.pp: {e}") from None
    if t.global_batch % (t.micro_batch * layout.dp):
        raise UsageError(f"train.global_batch {t.global_batch} must be divisible by train.micro_batch "
                         f"x data-parallel size = {t.micro_batch} x {layout.dp}")
    num_micro = t.global_batch // (t.micro_batch * layout.dp)
    if p.vpp and num_micro % p.pp:
        raise UsageError(f"parallel.vpp: megatron's interleaved schedule needs the {num_micro} micro batches per "
                         f"data-parallel rank to be a multiple of parallel.pp = {p.pp}")
    if t.fp8:
        check_fp8_shapes(preset, cfg)


def check_fp8_shapes(preset, cfg: configuration.Config) -> None:
    """Transformer Engine's FP8 GEMMs need the tokens of a rank divisible by 8 and every per-TP weight
    dimension by 16 (transformer_engine.pytorch.utils.assert_dim_for_fp8_exec): refuse before building."""
    p, t = cfg.parallel, cfg.train
    tokens = t.micro_batch * t.seq_len // p.cp // (p.tp if p.sequence_parallel else 1)
    if tokens % 8:
        raise UsageError(f"train.fp8: {tokens} tokens per rank (micro_batch x seq_len / CP"
                         f"{' / TP' if p.sequence_parallel else ''}) is not divisible by 8, as FP8 GEMMs need")
    d = preset.head_dim
    dims = {"hidden": preset.hidden_size,
            "query/key/value outputs / TP": (preset.num_heads + 2 * preset.num_query_groups) * d // p.tp,
            "attention heads x head dim / TP": preset.num_heads * d // p.tp,
            "ffn / TP": preset.ffn_hidden_size // p.tp}
    bad = [f"{name} = {size}" for name, size in dims.items() if size % 16]
    if bad:
        raise UsageError(f"train.fp8: FP8 GEMMs need weight dimensions divisible by 16; {', '.join(bad)} (TP {p.tp})")


def loss_plan(cfg: configuration.Config, preset, dp: int, dtype: str):
    """train.loss for this run: (full logits or not, the estimate it was decided from, the banner's line).
    "auto" decides from the memory estimate against parallel.gpu_memory_gb, as the dry run checks the layout:
    from the config alone, so every rank (and the dry run) decides the same."""
    from megarope import memory
    from megarope.loss import DEFAULT_CHUNK

    p, t = cfg.parallel, cfg.train
    estimate = memory.estimate_training_memory(preset, tp=p.tp, cp=p.cp, pp=p.pp, dp=dp, seq_len=t.seq_len,
                                               micro_batch=t.micro_batch,
                                               num_micro=t.global_batch // (t.micro_batch * dp), dtype=dtype)
    full, why = memory.choose_loss(estimate, t.recompute, p.gpu_memory_gb * memory.GB, t.loss)
    what = ("full logits, the output GEMM once" if full else
            f"chunked, {DEFAULT_CHUNK:,} tokens' logits at a time, recomputed in the backward pass")
    return full, estimate, f"loss: {what} ({why})"


# ----------------------------------------------------------------------------------------------- dry run
def dry_run(cfg: configuration.Config, world: int | None = None) -> tuple[str, str | None]:
    """`megarope train CONFIG --dry-run`: the layout, parameters per rank and estimated memory per GPU of
    this config's GPU run, from shapes alone (nothing is built, no data or checkpoint is read when
    model.preset is given). ``world``: the job's GPUs (default: WORLD_SIZE from the launcher, else the
    smallest world, TP x CP x PP). Returns the report and, for a layout that does not fit
    parallel.gpu_memory_gb, the one line refusing it (else None). Bad input raises UsageError.
    """
    from megarope import memory

    p, t = cfg.parallel, cfg.train
    gpu = Accelerator("an H100-class GPU (dry run)", (9, 0), p.gpu_memory_gb)
    check_config(cfg, gpu)
    world = world or int(os.environ.get("WORLD_SIZE", 0)) or p.tp * p.cp * p.pp
    parallel.check_sizes(world, p.tp, p.cp, p.pp)
    layout = parallel.Layout(p.tp, p.cp, p.pp, world // (p.tp * p.cp * p.pp), world, 0, p.vpp)
    preset, name = resolve_preset(cfg, read_init=cfg.model.preset is None)
    check_layout(cfg, preset, layout)
    dtype = resolve_dtype(cfg, gpu)
    num_micro = t.global_batch // (t.micro_batch * layout.dp)
    full_logits, estimate, loss_line = loss_plan(cfg, preset, layout.dp, dtype)
    stages = memory.stage_parameters(preset, p.tp, p.pp)
    gb = memory.GB
    rows = [("weights", f"{dtype}", estimate.weights),
            ("gradients", "fp32 DDP buffer", estimate.gradients),
            ("optimizer shard", f"{'fp32 masters + ' if dtype != 'fp32' else ''}Adam moments / (DP x CP = "
                                f"{layout.dp * p.cp})", estimate.optimizer),
            ("activations", f"recompute off, {estimate.in_flight} micro batch(es) in flight", estimate.activations),
            ("activations", "recompute on", estimate.activations_recompute),
            ("loss", f"{'full logits' if full_logits else 'chunked'}, one micro batch's",
             estimate.loss_full if full_logits else estimate.loss_chunked),
            ("workspace", "CUDA context, NCCL, allocator (an allowance)", estimate.workspace)]
    lines = [f"dry run: {layout.describe()}, {num_micro} micro batches of {t.micro_batch} x {t.seq_len} tokens "
             f"per data-parallel rank",
             f"model: {name} ({preset.num_layers} layers, {preset.num_layers // p.pp} per pipeline stage), "
             f"{memory.model_parameters(preset) / 1e9:.2f}B parameters; per rank: "
             + ", ".join(f"stage {i} {n / 1e9:.2f}B" for i, n in enumerate(stages)),
             f"estimated memory per GPU of the fullest rank (GB = 1e9 bytes; "
             f"parallel.gpu_memory_gb = {p.gpu_memory_gb:g}):",
             *(f"  {what:<16} {value / gb:7.1f}  {detail}" for what, detail, value in rows)]
    for recompute in (False, True):
        total = estimate.total(recompute, full_logits)
        chosen = " <- this config" if recompute == t.recompute else ""
        verdict = "fits" if total <= p.gpu_memory_gb * gb else "does NOT fit"
        lines.append(f"  total, recompute {'on ' if recompute else 'off'} {total / gb:7.1f}  {verdict}{chosen}")
    lines.append(loss_line)
    needed = estimate.total(t.recompute, full_logits)
    refusal = None
    if needed > p.gpu_memory_gb * gb:
        refusal = (f"the layout needs an estimated {needed / gb:.1f} GB per GPU with train.recompute "
                   f"{str(t.recompute).lower()}, more than parallel.gpu_memory_gb = {p.gpu_memory_gb:g}")
    return "\n".join(lines), refusal


# ----------------------------------------------------------------------------------------------- resolving
def resolve_model_and_tokenizer(cfg: configuration.Config):
    """(preset, preset name, tokenizer) from the config and init.from's checkpoint; the tokenizer is refused
    here, before any data is prepared or model built, when it cannot belong to the model (data.check_tokenizer:
    what eval would refuse of this run's checkpoints), init.from's model included."""
    preset, name = resolve_preset(cfg)
    init = cfg.init.from_
    carried = checkpoint.tokenizer_path(init) if init else None
    spec = cfg.data.tokenizer or carried
    if spec is None and cfg.data.path == configuration.AUTO_TOY:
        spec = "bytes"
    if spec is None:
        raise UsageError("data.tokenizer is required (\"bytes\" or a sentencepiece .model file)")
    tokenizer = data.load_tokenizer(spec)
    data.check_tokenizer(tokenizer, preset.vocab_size, checkpoint.read_meta(init) if init else None,
                         carried if cfg.data.tokenizer else None,
                         model=f"the model of {init}" if init else f"preset {name}")
    return preset, name, tokenizer


def resolve_preset(cfg: configuration.Config, read_init: bool = True):
    """(preset, its name): model.preset, checked against init.from's checkpoint, or that checkpoint's shape.
    ``read_init=False`` trusts model.preset without reading init.from (a dry run away from the data)."""
    from megarope.model import PRESETS, Preset, get_preset

    init_meta = checkpoint.read_meta(cfg.init.from_) if cfg.init.from_ and read_init else None
    if cfg.model.preset is not None:
        preset, name = get_preset(cfg.model.preset), cfg.model.preset
        if init_meta and Preset(**init_meta["preset"]) != preset:
            raise UsageError(f"init.from {cfg.init.from_} holds another model than preset {name!r}: "
                             f"{init_meta['preset']}")
        return preset, name
    if init_meta:
        preset = Preset(**init_meta["preset"])
        return preset, next((n for n, p in PRESETS.items() if p == preset), "from init.from")
    raise UsageError("model.preset is required when init.from is not given")


# ----------------------------------------------------------------------------------------------- resuming

def _layout_text(layout: dict) -> str:
    return "TP {tp} x CP {cp} x PP {pp}".format(**layout) + (f" (VPP {layout['vpp']})" if layout.get("vpp") else "")


def check_same_model(resume_dir: str, preset, name: str) -> None:
    from megarope.model import Preset

    if Preset(**checkpoint.read_meta(resume_dir)["preset"]) != preset:
        raise UsageError(f"{resume_dir} holds another model than this config's ({name}); use a new checkpoint.dir")


def check_data(resume_dir: str, fingerprint: list[dict] | None) -> None:
    """Refuse to resume on training data that differs from the data the checkpoint was trained on
    (data.fingerprint, compared source by source; a checkpoint from before fingerprints passes).
    Another corpus under the same name would silently change the samples every later step reads,
    and megatron's cached sample index (data.cache_dir) would still describe the old one.
    ``fingerprint``: this run's (rank 0's; None on the other ranks, which check nothing)."""
    saved = checkpoint.read_train_state(resume_dir).get("data")
    if fingerprint is None or saved is None:
        return
    hint = f"restore the data, or use a new checkpoint.dir (with init.from={resume_dir} to start from its weights)"
    if len(saved) != len(fingerprint):
        raise UsageError(f"the training data changed since {resume_dir} was saved: {len(saved)} source(s) then, "
                         f"{len(fingerprint)} now; {hint}")
    for old, new in zip(saved, fingerprint):
        prefix = new["prefix"]
        if old["bin_bytes"] != new["bin_bytes"]:
            what = f"{prefix}.bin is {new['bin_bytes']:,} bytes, {old['bin_bytes']:,} then"
        elif old["idx_sha256"] != new["idx_sha256"]:
            what = f"{prefix}.idx differs (documents added, removed, reordered or tokenized differently)"
        elif old["weight"] != new["weight"]:
            what = f"the blend weight of {prefix} is {new['weight']:g}, {old['weight']:g} then"
        else:
            continue
        moved = "" if prefix == old["prefix"] else f" (the data was at {old['prefix']} then)"
        raise UsageError(f"the training data changed since {resume_dir} was saved: {what}{moved}; {hint}")


def check_resume(cfg: configuration.Config, resume_dir: str, precision: dict, layout: parallel.Layout) -> None:
    """A run continues only what it started: same optimizer kind, batch, length, RoPE, backend and
    numerics; the layout may change where the optimizer's checkpoint format reshards (DP and CP always,
    the resume keeping the checkpoint's gradient buckets, optim.ddp_bucket_size; TP and PP with the CPU
    optimizer; see optim.CHECKPOINT_METADATA). To start something new from a checkpoint's weights, use
    init.from."""
    from megarope.rope import RopeConfig

    saved = checkpoint.read_train_state(resume_dir)
    hint = "use a new checkpoint.dir (with init.from to start from its weights)"
    if saved.get("optimizer") != optimizer_kind():
        raise UsageError(f"{resume_dir} holds {saved.get('optimizer')} optimizer state and this machine trains "
                         f"with {optimizer_kind()}; {hint}")
    old = saved.get("config", {}).get("train", {})
    for key in ("seq_len", "global_batch"):
        if old.get(key) not in (None, getattr(cfg.train, key)):
            raise UsageError(f"{resume_dir} was trained with train.{key}={old[key]}, this config says "
                             f"{getattr(cfg.train, key)}; {hint}")
    old_rope = checkpoint.read_meta(resume_dir).get("rope")
    old_rope = asdict(RopeConfig(**old_rope)) if old_rope is not None else None  # fields added since get defaults
    new_rope = asdict(RopeConfig(**cfg.rope_config()))
    if old_rope is not None and old_rope != new_rope:
        changed = ", ".join(f"rope.{k}: {old_rope.get(k)} -> {v}" for k, v in new_rope.items() if old_rope.get(k) != v)
        raise UsageError(f"{resume_dir} was trained with another RoPE ({changed}); {hint}")
    old_documents = {name: saved.get("config", {}).get("data", {}).get(name, False)
                     for name in configuration.DOCUMENT_OPTIONS}
    if old_documents != cfg.data.documents():
        changed = ", ".join(f"data.{k}: {str(old_documents[k]).lower()} -> {str(v).lower()}"
                            for k, v in cfg.data.documents().items() if old_documents[k] != v)
        raise UsageError(f"{resume_dir} was trained with other document options ({changed}); {hint}")
    old_precision = saved.get("precision")
    if old_precision is not None and old_precision != precision:
        changed = ", ".join(f"{k}: {old_precision.get(k)} -> {v}"
                            for k, v in precision.items() if old_precision.get(k) != v)
        raise UsageError(f"{resume_dir} was trained with other numerics ({changed}); {hint}")
    old_layout = {"tp": 1, "cp": 1, "pp": 1, "vpp": None, **saved.get("layout", {})}
    new_layout = {"tp": layout.tp, "cp": layout.cp, "pp": layout.pp, "vpp": layout.vpp}
    model_parallel = ("tp", "pp", "vpp")
    if (not reshards_across_model_parallel(saved["optimizer"])
            and any(old_layout[k] != new_layout[k] for k in model_parallel)):
        raise UsageError(f"{resume_dir} was saved at {_layout_text(old_layout)} and this run is "
                         f"{_layout_text(new_layout)}: megatron's distributed optimizer state reshards over DP and CP "
                         f"only; resume at the saved TP and PP, or {hint}")

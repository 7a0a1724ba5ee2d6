"""HF checkpoints of the LLaMA family (llama, mistral, qwen2) <-> megarope checkpoints.

HF -> megarope: config.json is read directly (both the old top-level ``rope_theta``/``rope_scaling``
and the newer ``rope_parameters``), every tensor's name and shape and the tokenizer are checked
against it before anything heavy is imported, then the model is filled and saved with
checkpoint.save_model (dist_checkpointing reshards at load time: one checkpoint serves every TP/CP
layout). ``HFCheckpoint`` (and ``load_hf``) does the same in memory, for the parallel layout already
set up, writing nothing: each rank reads only its tensor-parallel shard, one rank per data- and
context-parallel group reads it for the group, and every model built from it (an evaluation's RoPE
variants) shares that one reading.

Each family is one table of megatron <-> HF names (FAMILIES). Weight layout: megatron's linear_qkv
holds, for each query group g, [the group's q heads, k_g, v_g] along dim 0 (its bias too);
linear_fc1 is cat([gate, up]). HF's q/k rows are already in the rotate_half order that megatron's
non-interleaved RoPE uses, so no permutation is needed. Tied embeddings stay tied (megatron's
share_embeddings_and_output_weights).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass

from megarope import lineage as lineages
from megarope.errors import UsageError
from megarope.files import atomic_dir
from megarope.trust import FOREIGN, Trust

# One row per tensor: the megatron name (TP=1), the HF name(s) fused into it in this order, and each HF
# tensor's shape in the dimensions h (hidden), q (heads x head dim), kv (KV heads x head dim), f (FFN), v (vocab).
# "{i}" is the layer. linear_qkv fuses by query group, the other fused rows concatenate along dim 0.
LLAMA_TABLE = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ("v h",)),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), ("h",)),
    ("output_layer.weight", ("lm_head.weight",), ("v h",)),  # absent when the embeddings are tied
    ("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), ("h",)),
    ("decoder.layers.{i}.self_attention.linear_qkv.weight",
     ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
      "model.layers.{i}.self_attn.v_proj.weight"), ("q h", "kv h", "kv h")),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", ("model.layers.{i}.self_attn.o_proj.weight",), ("h q",)),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",), ("h",)),
    ("decoder.layers.{i}.mlp.linear_fc1.weight",
     ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), ("f h", "f h")),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), ("h f",)),
)
QWEN2_TABLE = LLAMA_TABLE + (
    ("decoder.layers.{i}.self_attention.linear_qkv.bias",
     ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
      "model.layers.{i}.self_attn.v_proj.bias"), ("q", "kv", "kv")),
)
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")  # padded to a multiple of 128


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    table: tuple
    qkv_bias: bool = False


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", LLAMA_TABLE),
    "mistral": Family("mistral", "MistralForCausalLM", LLAMA_TABLE),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", QWEN2_TABLE, qkv_bias=True),
}
SUPPORTED = "llama (Llama-2, Llama-3.x), mistral and qwen2"


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"not an HF model directory (no config.json): {hf_dir}")
    with open(path) as f:
        return json.load(f)


def family_of(cfg: dict) -> Family:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures")
    family = FAMILIES.get(model_type)
    if family is None or (archs and family.architecture not in archs):
        raise UsageError(f"model_type {model_type!r} (architectures {archs}) does not convert: megarope converts the "
                         f"{SUPPORTED} families")
    return family


def _check_family_options(family: Family, cfg: dict) -> None:
    """What each family may vary that megarope's decoder does not."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise UsageError(f"hidden_act {cfg['hidden_act']!r}: the {family.model_type} family converts with silu only")
    if family.model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise UsageError("a llama with attention_bias or mlp_bias does not convert (qwen2 biases q/k/v only)")
    if family.model_type == "mistral" and cfg.get("sliding_window", 4096) is not None:  # transformers' default: 4096
        raise UsageError(f"mistral with sliding_window {cfg.get('sliding_window', 4096)}: megarope attends to the "
                         f"whole causal context, so only sliding_window null converts")
    if family.model_type == "qwen2" and (cfg.get("use_sliding_window")
                                         or "sliding_attention" in (cfg.get("layer_types") or [])):
        raise UsageError("qwen2 with use_sliding_window: megarope attends to the whole causal context, so only "
                         "full attention converts")


def rope_fields(cfg: dict) -> dict:
    """config.json's RoPE (theta and rope_scaling / rope_parameters) as megarope RopeConfig fields, exactly."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rtype = params.get("rope_type", params.get("type", "default"))
    max_len = cfg["max_position_embeddings"]
    rope = {"base": float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), "train_len": max_len}
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UsageError("partial_rotary_factor != 1 is not a LLaMA layout")
    factor = params.get("factor")
    if rtype not in ("default", "yarn") and not isinstance(factor, (int, float)):
        raise UsageError(f"RoPE type {rtype!r} needs a numeric 'factor' in config.json")
    if rtype == "linear":
        rope["linear_factor"] = float(factor)
    elif rtype == "dynamic":  # transformers scales from max_position_embeddings (ignoring any "original" length)
        rope.update(dynamic_ntk=True, ntk_alpha=float(factor))
    elif rtype == "llama3":  # the original length defaults as transformers' standardize_rope_params sets it
        rope.update(llama3_factor=float(factor), llama3_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                    llama3_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                    llama3_original_len=int(params.get("original_max_position_embeddings")
                                            or cfg.get("original_max_position_embeddings") or max_len))
    elif rtype == "yarn":
        rope["yarn"] = _yarn_fields(params, cfg)
    elif rtype != "default":
        raise UsageError(f"unsupported RoPE type {rtype!r} (default, linear, dynamic, llama3 and yarn convert)")
    return rope


def _yarn_fields(params: dict, cfg: dict) -> dict:
    """transformers' YaRN parameters as megatron's (rope.Yarn): the same ramp and the same temperature."""
    import math

    original = int(params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
                   or cfg["max_position_embeddings"])
    factor = params.get("factor")
    factor = float(factor) if factor is not None else cfg["max_position_embeddings"] / original  # as transformers
    yarn = {"factor": factor, "original_len": original, "beta_fast": float(params.get("beta_fast") or 32),
            "beta_slow": float(params.get("beta_slow") or 1), "truncate": bool(params.get("truncate", True))}
    mscale, mscale_all_dim, attention = params.get("mscale"), params.get("mscale_all_dim"), params.get("attention_factor")
    if attention is not None:  # the temperature itself: megatron takes it as mscale over a denominator of 1
        if factor <= 1 and attention != 1:
            raise UsageError(f"yarn attention_factor {attention} with factor {factor} <= 1 has no megatron equivalent")
        yarn["mscale"] = 1.0 if factor <= 1 else (float(attention) - 1.0) / (0.1 * math.log(factor))
    elif mscale and mscale_all_dim:  # transformers uses both only when both are set (and non-zero)
        yarn.update(mscale=float(mscale), mscale_all_dim=float(mscale_all_dim))
    return yarn


def hf_fields(cfg: dict) -> tuple[Family, dict, dict]:
    """config.json -> (family, megarope Preset fields, RopeConfig fields); UsageError for what does not convert."""
    family = family_of(cfg)
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                           "vocab_size", "max_position_embeddings") if k not in cfg]
    if missing:
        raise UsageError(f"config.json lacks {', '.join(missing)}")
    _check_family_options(family, cfg)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden % heads == 0 else None)
    if head_dim is None or heads % groups:
        raise UsageError(f"unsupported attention shape: hidden {hidden}, heads {heads}, kv heads {groups}, "
                         f"head_dim {cfg.get('head_dim')}")
    preset = dict(num_layers=cfg["num_hidden_layers"], hidden_size=hidden, num_heads=heads, num_query_groups=groups,
                  ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                  max_seq_len=cfg["max_position_embeddings"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                  kv_channels=head_dim if head_dim != hidden // heads else None,
                  tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=family.qkv_bias)
    return family, preset, rope_fields(cfg)


def family_for(meta: dict) -> Family:
    """The family a megarope checkpoint exports as: the one it was converted from, else llama (qwen2 with q/k/v biases)."""
    name = meta.get("family") or ("qwen2" if meta["preset"].get("qkv_bias") else "llama")
    return FAMILIES[name]


def _dims(p: dict) -> dict[str, int]:
    head_dim = p.get("kv_channels") or p["hidden_size"] // p["num_heads"]
    return {"h": p["hidden_size"], "q": p["num_heads"] * head_dim, "kv": p["num_query_groups"] * head_dim,
            "f": p["ffn_hidden_size"], "v": p["vocab_size"]}


def rows(family: Family, p: dict):
    """(megatron name, HF names, HF shapes) of every tensor of a model of Preset fields ``p``."""
    dims = _dims(p)
    for mcore, hf, shapes in family.table:
        if mcore == "output_layer.weight" and p.get("tie_embeddings"):
            continue
        shapes = tuple(tuple(dims[d] for d in s.split()) for s in shapes)
        for i in range(p["num_layers"]) if "{i}" in mcore else [None]:
            yield mcore.format(i=i), tuple(n.format(i=i) for n in hf), shapes


def hf_shapes(family: Family, p: dict) -> dict[str, tuple]:
    """Every tensor an HF checkpoint of this family and these Preset fields holds, with its shape."""
    return {name: shape for _, names, shapes in rows(family, p) for name, shape in zip(names, shapes)}


class HFWeights:
    """An HF checkpoint's tensors: names and shapes without loading any, each tensor (or a part of one) on
    demand. ``bytes_read`` counts what was read: the measure of how much of the checkpoint a rank reads."""

    def __init__(self, hf_dir: str):
        self.files, self.shapes, self._open = {}, {}, {}  # name -> file, name -> shape, file -> handle
        self.bytes_read = 0
        for kind, index, pattern in (("safetensors", "model.safetensors.index.json", "model*.safetensors"),
                                     ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin")):
            wanted = None
            if os.path.isfile(os.path.join(hf_dir, index)):
                with open(os.path.join(hf_dir, index)) as f:
                    wanted = json.load(f)["weight_map"]
                files = sorted(set(wanted.values()))
                for name in files:
                    if not os.path.isfile(os.path.join(hf_dir, name)):
                        raise UsageError(f"shard {name} named in {index} is missing from {hf_dir}")
            else:
                files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, pattern)))
            if files:
                break
        else:
            raise UsageError(f"no model*.safetensors or pytorch_model*.bin weights in {hf_dir}")
        for name in files:
            path = os.path.join(hf_dir, name)
            try:
                found = self._safetensors_shapes(path) if kind == "safetensors" else self._bin_shapes(path)
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file, whatever the library raises
                raise UsageError(f"cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
            for key, shape in found:
                if wanted is None or wanted.get(key) == name:
                    self.files[key], self.shapes[key] = path, tuple(shape)
        if wanted is not None and wanted.keys() - self.files.keys():
            raise UsageError(f"tensor {sorted(wanted.keys() - self.files.keys())[0]} is not in the shard the index names")

    @staticmethod
    def _safetensors_shapes(path):
        with open(path, "rb") as f:  # an 8-byte header length, then a JSON header
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        return [(k, v["shape"]) for k, v in header.items() if k != "__metadata__"]

    def _bin_shapes(self, path):
        import torch

        self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return [(k, v.shape) for k, v in self._open[path].items()]

    def check(self, expected: dict[str, tuple]) -> None:
        names = {n for n in self.shapes if not n.endswith("rotary_emb.inv_freq")}
        if expected.keys() - names:
            raise UsageError(f"tensor {sorted(expected.keys() - names)[0]} is missing from the checkpoint")
        if names - expected.keys():
            raise UsageError(f"unexpected tensor {sorted(names - expected.keys())[0]} (not a plain checkpoint of "
                             f"its family?)")
        for name, shape in expected.items():
            if self.shapes[name] != shape:
                raise UsageError(f"tensor {name} has shape {list(self.shapes[name])}, expected {list(shape)}")

    def read(self, name: str, index: tuple[slice, ...] | None = None):
        """Tensor ``name``, or only the part ``index`` selects (from the memory-mapped file: no more is read)."""
        path = self.files[name]
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(path, framework="pt")
        handle = self._open[path]
        if isinstance(handle, dict):  # a .bin file, memory-mapped: the copy touches only the selected part
            tensor = handle[name] if index is None else handle[name][index].clone()
        else:
            tensor = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def __getitem__(self, name: str):
        return self.read(name)


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of HF tensor ``name`` (None: that many zero rows, the padding of the vocabulary)."""

    name: str | None
    start: int
    stop: int


def hf_to_mcore_rows(family: Family, p: dict) -> dict[str, list[Rows]]:
    """Every full (TP=1) megatron tensor as the HF rows it is made of, in order along its first dimension, by the
    family's table: linear_qkv per query group [its q heads; k; v], the other fused tensors one HF tensor after
    the other, the vocabulary padded with zero rows to megarope's multiple of 128."""
    from megarope.model import VOCAB_MULTIPLE

    padded = -(-p["vocab_size"] // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    groups = p["num_query_groups"]
    layout = {}
    for mcore, names, shapes in rows(family, p):
        if ".linear_qkv." in mcore:
            per_group = [shape[0] // groups for shape in shapes]
            parts = [Rows(n, g * k, (g + 1) * k) for g in range(groups) for n, k in zip(names, per_group)]
        else:
            parts = [Rows(n, 0, shape[0]) for n, shape in zip(names, shapes)]
        if mcore in VOCAB_ROWS:
            parts.append(Rows(None, 0, padded - shapes[0][0]))
        layout[mcore] = parts
    return layout


class LazyTensor:
    """A full (TP=1) megatron tensor made of HF rows (hf_to_mcore_rows), read only where it is indexed.

    ``t[index]`` (a tuple of slices: what load_full_state takes of each tensor, this rank's piece) reads just
    those rows and columns from the HF files, and remembers them: another model built from the same checkpoint
    (another RoPE variant) takes the piece without reading it again."""

    def __init__(self, weights: HFWeights, parts: list[Rows], rest: tuple[int, ...]):
        self.weights, self.parts = weights, parts
        self.shape = (sum(p.stop - p.start for p in parts), *rest)
        self._read = {}

    def __getitem__(self, index: tuple[slice, ...]):
        import torch

        index = tuple(slice(*s.indices(n)) for s, n in zip(index, self.shape))
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in self._read:
            first, last = index[0].start, index[0].stop
            pieces, offset = [], 0
            for part in self.parts:
                lo, hi = max(first, offset), min(last, offset + part.stop - part.start)
                if lo < hi and part.name is None:  # vocabulary padding (the last part)
                    columns = [len(range(*c.indices(n))) for c, n in zip(index[1:], self.shape[1:])]
                    dtype = pieces[-1].dtype if pieces else torch.float32
                    pieces.append(torch.zeros(hi - lo, *columns, dtype=dtype))
                elif lo < hi:
                    rows = slice(part.start + lo - offset, part.start + hi - offset)
                    pieces.append(self.weights.read(part.name, (rows, *index[1:])))
                offset += part.stop - part.start
            self._read[key] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return self._read[key]


def lazy_state(source: HFSource) -> dict[str, LazyTensor]:
    """The full (TP=1) megatron tensors of an inspected HF directory, each read only where it is indexed."""
    parts = hf_to_mcore_rows(source.family, source.preset)
    shapes = source.weights.shapes
    return {name: LazyTensor(source.weights, rows_of, shapes[next(r.name for r in rows_of if r.name)][1:])
            for name, rows_of in parts.items()}


def mcore_to_hf_state(state: dict, family: Family, p: dict) -> dict:
    """The inverse of hf_to_mcore_rows: HF tensors from full megatron tensors (contiguous, padded vocab rows
    dropped)."""
    dims = _dims(p)
    out = {}
    for mcore, names, shapes in rows(family, p):
        t = state[mcore]
        if mcore in VOCAB_ROWS:
            t = t[:dims["v"]]
        if ".linear_qkv." in mcore:
            rest = t.shape[1:]
            per_group = [s[0] // p["num_query_groups"] for s in shapes]
            parts = [x.reshape(-1, *rest) for x in t.reshape(p["num_query_groups"], -1, *rest).split(per_group, dim=1)]
        else:
            parts = t.split([s[0] for s in shapes]) if len(names) > 1 else [t]
        out.update(zip(names, parts))
    return {k: t.detach().contiguous().clone() for k, t in out.items()}


def load_full_state(model, full: dict) -> None:
    """Load full (TP=1) megatron tensors into ``model``, whatever TP layout it was built for.

    Each rank takes its piece of each tensor where the model's sharded state dict says it lies in the
    global tensor -- what dist_checkpointing reads from a checkpoint, SwiGLU's gate/up halves included
    through megatron's own factories -- so no layout rule is repeated here.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    sharded, _, factories = load_preprocess(model.sharded_state_dict())
    tensors = {n for n, v in sharded.items() if not isinstance(v, ShardedObject)}
    if tensors != full.keys():
        odd = sorted(tensors ^ full.keys())
        raise ValueError(f"tensors of the model and of the state differ: {odd[:3]}")

    def piece(name, sh):
        if isinstance(sh, ShardedObject):  # e.g. TE's extra state: kept as the model has it
            return sh.data
        t = full[name]
        if tuple(t.shape) != tuple(sh.global_shape[sh.prepend_axis_num:]):
            raise ValueError(f"{name}: shape {list(t.shape)}, the model's is {list(sh.global_shape)}")
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[sh.prepend_axis_num:], sh.local_shape))
        return t[index].to(sh.dtype)

    loaded = {n: [piece(n, x) for x in v] if isinstance(v, list) else piece(n, v) for n, v in sharded.items()}
    model.load_state_dict(apply_factory_merges(loaded, factories))


# ----------------------------------------------------------------------------------------------- HF -> megarope
@dataclass
class HFSource:
    """An HF directory, checked: everything conversion needs, nothing loaded yet."""

    path: str
    config: dict
    family: Family
    preset: dict
    rope: dict
    weights: HFWeights
    lineage: lineages.Lineage
    tokenizer: object | None  # a megarope.data.Tokenizer


def inspect_hf(hf_dir: str, tokenizer: str | None = None, pretrain_base: float | None = None,
               pretrain_len: int | None = None, tune_len: int | None = None, tp: int = 1,
               lineage_given_as: str = "--{flag}") -> HFSource:
    """Check an HF directory before anything is built or written: config, tensors, tokenizer, lineage
    (``lineage_given_as``: where the given lineage numbers come from, see lineage.from_hf_config)."""
    cfg = read_hf_config(hf_dir)
    family, preset, rope = hf_fields(cfg)
    for what, n in (("attention heads", preset["num_heads"]), ("KV heads", preset["num_query_groups"]),
                    ("FFN size", preset["ffn_hidden_size"])):
        if n % tp:
            raise UsageError(f"--tp {tp} does not divide the model's {what} ({n})")
    try:
        lineage = lineages.from_hf_config(cfg, pretrain_base, pretrain_len, tune_len, lineage_given_as)
    except ValueError as e:
        raise UsageError(f"lineage: {e}") from None
    if lineage.tune_len < lineage.pretrain_len and any(v is not None for v in (pretrain_len, tune_len)):
        raise UsageError(f"tune length {lineage.tune_len} ({lineage.sources['tune_len']}) is shorter than the "
                         f"pretraining length {lineage.pretrain_len} ({lineage.sources['pretrain_len']})")
    weights = HFWeights(hf_dir)
    expected = hf_shapes(family, preset)
    if preset["tie_embeddings"]:  # a tied checkpoint may also store lm_head: it equals the embedding, unused
        expected.update({k: weights.shapes[k] for k in ("lm_head.weight",) if k in weights.shapes})
    weights.check(expected)
    return HFSource(hf_dir, cfg, family, preset, rope, weights, lineage,
                    _tokenizer_for(hf_dir, tokenizer, preset["vocab_size"]))


def _tokenizer_for(hf_dir: str, spec: str | None, model_vocab: int):
    """The tokenizer to travel with the checkpoint: ``spec``, else the HF directory's own (an HF tokenizer,
    else a tokenizer.model), else none; refused when it cannot belong to the model (data.check_tokenizer:
    a ``spec`` with other contents than the directory's own, too)."""
    from megarope import data

    if any(os.path.isfile(os.path.join(hf_dir, f)) for f in data.HF_TOKENIZER_MARKERS):
        own = hf_dir
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        own = os.path.join(hf_dir, "tokenizer.model")
    else:
        own = None
    if spec is None and own is None:
        return None
    tokenizer = data.load_tokenizer(spec or own)
    data.check_tokenizer(tokenizer, model_vocab, carried=own if spec is not None else None,
                         model=f"the model of {hf_dir}")
    return tokenizer


def _meta(source: HFSource, preset, rope, backend: str, tp: int) -> dict:
    tok = source.tokenizer
    meta = {"preset": preset.to_dict(), "rope": asdict(rope), "backend": backend, "source": "hf",
            "family": source.family.model_type, "hf_config": source.config, "intended_tp": tp,
            "lineage": source.lineage.to_dict(),
            "tokenizer": tok.spec if tok is not None and tok.path is None else None}  # "bytes"; files: finish_save
    if tok is not None:
        meta.update(tokenizer_vocab_size=tok.vocab_size, tokenizer_bos=tok.bos, tokenizer_eod=tok.eod,
                    tokenizer_files=[os.path.basename(f) for f in tok.files], tokenizer_digest=tok.digest)
    return meta


def _rope(source: HFSource, overrides: dict | None = None):
    from megarope.rope import RopeConfig

    try:
        return RopeConfig(**{**source.rope, **(overrides or {})})
    except ValueError as e:
        raise UsageError(f"RoPE: {e}") from None


def hf_meta(source: HFSource) -> dict:
    """What a converted checkpoint's megarope.json would hold for an inspected HF directory, without
    building anything; "tokenizer" is the spec of the tokenizer it would carry (its path, or "bytes")."""
    from megarope.model import Preset

    meta = _meta(source, Preset(**source.preset), _rope(source), "local", tp=1)
    meta["tokenizer"] = source.tokenizer.spec if source.tokenizer is not None else None
    return meta


class HFCheckpoint:
    """An HF directory, checked (inspect_hf), from which to build loaded models for the parallel state already
    set up (any TP/CP/DP), converted in memory: nothing is written, and the weights are read once for every
    model built from it (an evaluation's RoPE variants: RoPE has no weights).

    A rank needs its tensor-parallel shard only, and the ranks of a data- and context-parallel group need
    the same one: the group's first rank reads it, only those rows and columns of the memory-mapped files
    (LazyTensor), and keeps it for the next model; the other ranks receive the loaded weights from it, a
    broadcast over the group once the readers are done (they are waited for on the host-side group, not
    inside the broadcast: parallel.py). A 7B model evaluated in 4 variants on 8 GPUs at TP 8 is read once
    in all, an eighth by each rank; at TP 1 x CP 8, once, by one rank. The price: a reading rank holds its
    shard in host memory (in the files' dtype) for as long as this object lives.
    """

    def __init__(self, hf_dir: str, tokenizer: str | None = None):
        self.path = hf_dir
        self.source = inspect_hf(hf_dir, tokenizer)
        self.state = lazy_state(self.source)

    def meta(self, backend: str = "local") -> dict:
        """What a converted checkpoint's megarope.json would hold, "tokenizer" the tokenizer's own spec (a path)."""
        return {**hf_meta(self.source), "backend": backend}

    def model(self, backend: str = "local", rope_overrides: dict | None = None, **config_kwargs):
        """A model of this checkpoint with RoPE ``rope_overrides`` for the current parallel state (without one, a
        world of one: parallel.ensure), collective over the data- and context-parallel group; ``config_kwargs`` go
        to model.build_model (dtype, ...)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        from megarope import model as model_mod, parallel

        parallel.ensure()
        model = model_mod.build_model(model_mod.Preset(**self.source.preset), _rope(self.source, rope_overrides),
                                      backend, **config_kwargs)
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        reader = dist.get_process_group_ranks(group)[0]
        if dist.get_rank() == reader:
            load_full_state(model, self.state)
        if dist.get_world_size(group) > 1:
            parallel.wait_for_all()
            for param in model.parameters():
                dist.broadcast(param.data, src=reader, group=group)
        return model


def load_hf(hf_dir: str, backend: str = "local", rope_overrides: dict | None = None, tokenizer: str | None = None,
            **config_kwargs):
    """An HF directory as a built, loaded megarope model for the current parallel state (any TP/CP; without
    one, a world of one, as checkpoint.build_from_checkpoint sets up), converted in memory: nothing is written.
    Returns (model, metadata): HFCheckpoint's model and meta; build several models of one directory from one
    HFCheckpoint instead, which reads the weights once."""
    hf = HFCheckpoint(hf_dir, tokenizer)
    return hf.model(backend, rope_overrides, **config_kwargs), hf.meta(backend)


def _check_destination(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"destination {path} already exists and is not empty; refusing to overwrite")


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, tokenizer: str | None = None,
                pretrain_base: float | None = None, pretrain_len: int | None = None,
                tune_len: int | None = None, lineage_given_as: str = "--{flag}") -> dict:
    """Convert an HF directory (llama, mistral, qwen2) into a megarope checkpoint; returns its metadata.

    ``tokenizer`` replaces the directory's own; ``pretrain_base``/``pretrain_len``/``tune_len`` replace what
    config.json says of the model's lineage (see megarope.lineage; ``lineage_given_as`` names where they
    come from). Nothing is written on bad input.
    """
    _check_destination(out_dir)
    source = inspect_hf(hf_dir, tokenizer, pretrain_base, pretrain_len, tune_len, tp, lineage_given_as)

    from megarope import checkpoint, parallel  # imported late: every input check above runs without them
    from megarope.model import Preset, build_model

    parallel.init(tp=1)
    preset, rope = Preset(**source.preset), _rope(source)
    model = build_model(preset, rope, "local")
    load_full_state(model, lazy_state(source))
    meta = _meta(source, preset, rope, "local", tp)
    checkpoint.save_model(model, out_dir, meta, tokenizer_file=source.tokenizer.path if source.tokenizer else None)
    return checkpoint.read_meta(out_dir)


def describe_conversion(meta: dict) -> str:
    """What convert did, in lines: shape, embeddings, RoPE mapping, tokenizer, lineage and its sources."""
    p, rope, cfg = meta["preset"], meta["rope"], meta.get("hf_config") or {}
    from megarope.rope import RopeConfig

    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rtype = params.get("rope_type", params.get("type", "default"))
    head_dim = p.get("kv_channels") or p["hidden_size"] // p["num_heads"]
    lines = [f"model: {meta.get('family', 'llama')}, {p['num_layers']} layers, hidden {p['hidden_size']}, "
             f"{p['num_heads']} heads x {head_dim} ({p['num_query_groups']} KV heads), vocab {p['vocab_size']:,}"
             + (", q/k/v biases" if p.get("qkv_bias") else ""),
             "embeddings: " + ("kept tied (the output layer shares the input embedding)" if p.get("tie_embeddings")
                               else "untied (separate output layer)"),
             f"RoPE: config.json rope_type {rtype} -> {RopeConfig(**rope).describe()}"]
    if meta.get("tokenizer"):
        files = meta.get("tokenizer_files") or [meta["tokenizer"]]
        bos = meta.get("tokenizer_bos")
        where = "recorded as" if not meta.get("tokenizer_files") else "copied to"
        lines.append(f"tokenizer: {meta.get('tokenizer_vocab_size', 0):,} tokens, {where} {meta['tokenizer']} "
                     f"({', '.join(files)}); BOS {'id ' + str(bos) if bos is not None else 'none'}, "
                     f"EOS id {meta.get('tokenizer_eod')}")
    else:
        lines.append("tokenizer: none found (give --tokenizer here, or data.tokenizer / --tokenizer later)")
    lin = lineages.lineage_of(meta)
    lines.append("lineage (what the scaling law is predicted from):")
    lines += [f"  {line}" for line in lin.describe().splitlines()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- megarope -> HF
def hf_config_from_meta(meta: dict) -> dict:
    """A transformers config dict of the checkpoint's family: rope_parameters (new readers) and
    rope_theta/rope_scaling (old ones)."""
    from megarope.rope import RopeConfig

    p, rope = meta["preset"], RopeConfig(**meta["rope"])
    family = family_for(meta)
    if rope.log_scale_ref is not None or rope.rotary_percent != 1.0:
        raise UsageError("log-scaled attention and partial rotary have no HF equivalent; "
                         "export without them (they are load-time options)")
    params = {"rope_type": "default"}
    if rope.llama3_factor:
        params = {"rope_type": "llama3", "factor": rope.llama3_factor, "low_freq_factor": rope.llama3_low_freq_factor,
                  "high_freq_factor": rope.llama3_high_freq_factor,
                  "original_max_position_embeddings": rope.llama3_original_len}
    elif rope.linear_factor:
        params = {"rope_type": "linear", "factor": rope.linear_factor}
    elif rope.dynamic_ntk:
        params = {"rope_type": "dynamic", "factor": rope.ntk_alpha}
    elif rope.yarn:
        y = rope.yarn
        params = {"rope_type": "yarn", "factor": y.factor, "original_max_position_embeddings": y.original_len,
                  "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "truncate": y.truncate}
        if y.mscale_all_dim:
            params.update(mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
        elif y.mscale != 1.0:
            params["attention_factor"] = y.attention_factor
    head_dim = p.get("kv_channels") or p["hidden_size"] // p["num_heads"]
    cfg = {k: v for k, v in (meta.get("hf_config") or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cfg.update(architectures=[family.architecture], model_type=family.model_type, vocab_size=p["vocab_size"],
               hidden_size=p["hidden_size"], intermediate_size=p["ffn_hidden_size"],
               num_hidden_layers=p["num_layers"], num_attention_heads=p["num_heads"],
               num_key_value_heads=p["num_query_groups"], head_dim=head_dim, hidden_act="silu",
               max_position_embeddings=rope.train_len, rms_norm_eps=p["norm_eps"],
               tie_word_embeddings=bool(p.get("tie_embeddings")), rope_theta=rope.base,
               rope_parameters={"rope_theta": rope.base, **params}, torch_dtype="float32", dtype="float32")
    cfg.update({"llama": {"attention_bias": False, "mlp_bias": False}, "mistral": {"sliding_window": None},
                "qwen2": {"use_sliding_window": False, "sliding_window": None,
                          "max_window_layers": p["num_layers"]}}[family.model_type])
    if params["rope_type"] != "default":
        cfg["rope_scaling"] = params  # what transformers 4.x reads (5.x prefers it too when present)
    return cfg


def mcore_to_hf(ckpt_dir: str, out_dir: str, trust: Trust = FOREIGN) -> dict:
    """Export a megarope checkpoint as an HF directory of its family (fp32 model.safetensors, its tokenizer's
    files); returns the config. ``trust``: how far loading the checkpoint trusts it (megarope.trust)."""
    _check_destination(out_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, "megarope.json")):
        raise UsageError(f"not a megarope checkpoint (no megarope.json): {ckpt_dir}")
    with open(os.path.join(ckpt_dir, "megarope.json")) as f:
        meta = json.load(f)
    cfg = hf_config_from_meta(meta)
    from safetensors.torch import save_file

    from megarope import checkpoint, data, parallel

    parallel.init(tp=1)
    model = checkpoint.build_from_checkpoint(ckpt_dir, backend="local", trust=trust)
    tensors = mcore_to_hf_state(model.state_dict(), family_for(meta), meta["preset"])
    tokenizer = checkpoint.tokenizer_path(ckpt_dir)
    files = data.load_tokenizer(tokenizer).files if tokenizer and os.path.exists(tokenizer) else []
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        for path in files:  # sentencepiece's tokenizer.model, or an HF tokenizer's files, beside the weights
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
    return cfg

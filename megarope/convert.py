"""HF LLaMA checkpoints <-> megarope checkpoints (megatron dist_checkpointing).

HF -> megarope: config.json is read directly (both the old top-level ``rope_theta``/``rope_scaling``
and the newer ``rope_parameters``), every tensor's name and shape is checked against it before
anything heavy is imported, then a TP=1 model is filled and saved with checkpoint.save_model.
dist_checkpointing reshards at load time, so one saved checkpoint serves every TP/CP layout.

Weight layout: megatron's linear_qkv holds, for each query group g, [the group's q heads, k_g, v_g]
along dim 0; linear_fc1 is cat([gate, up]). HF's q/k rows are already in the rotate_half order
that megatron's non-interleaved RoPE uses, so no permutation is needed.
Tied embeddings (tie_word_embeddings) are converted by copying the embedding into the output layer:
megarope always trains them untied.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct

from megarope.errors import UsageError
from megarope.files import atomic_dir

LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"not an HF model directory (no config.json): {hf_dir}")
    with open(path) as f:
        return json.load(f)


def hf_fields(cfg: dict) -> tuple[dict, dict]:
    """config.json -> (megarope Preset fields, RopeConfig fields); UsageError for what we cannot convert."""
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type") != "llama" or "LlamaForCausalLM" not in archs:
        raise UsageError(f"only LLaMA checkpoints convert (model_type llama, LlamaForCausalLM); got model_type "
                         f"{cfg.get('model_type')!r}, architectures {archs}")
    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                           "vocab_size", "max_position_embeddings") if k not in cfg]
    if missing:
        raise UsageError(f"config.json lacks {', '.join(missing)}")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    groups = cfg.get("num_key_value_heads") or heads
    if hidden % heads or heads % groups or cfg.get("head_dim", hidden // heads) not in (None, hidden // heads):
        raise UsageError(f"unsupported attention shape: hidden {hidden}, heads {heads}, kv heads {groups}, "
                         f"head_dim {cfg.get('head_dim')} (head_dim must be hidden/heads)")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UsageError("unsupported LLaMA variant: needs hidden_act silu and no attention/MLP biases")
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rtype = params.get("rope_type", params.get("type", "default"))
    max_len = cfg["max_position_embeddings"]
    rope = {"base": float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), "train_len": max_len}
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UsageError("partial_rotary_factor != 1 is not a LLaMA layout")
    if rtype != "default" and not isinstance(params.get("factor"), (int, float)):
        raise UsageError(f"RoPE type {rtype!r} needs a numeric 'factor' in config.json")
    if rtype == "linear":
        rope["linear_factor"] = float(params["factor"])
    elif rtype == "dynamic":  # transformers scales from max_position_embeddings (ignoring any "original" length)
        rope.update(dynamic_ntk=True, ntk_alpha=float(params["factor"]))
    elif rtype == "llama3":
        odd = {k: params[k] for k, v in LLAMA3_DEFAULTS.items() if k in params and params[k] != v}
        if odd:
            raise UsageError(f"llama3 RoPE scaling: megatron supports only {LLAMA3_DEFAULTS}, got {odd}")
        rope["llama3_factor"] = float(params["factor"])
    elif rtype != "default":
        raise UsageError(f"unsupported RoPE type {rtype!r} (default, linear, dynamic, llama3 convert)")
    preset = dict(num_layers=cfg["num_hidden_layers"], hidden_size=hidden, num_heads=heads, num_query_groups=groups,
                  ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], max_seq_len=max_len,
                  norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))
    return preset, rope


def hf_shapes(p: dict, tied: bool) -> dict[str, tuple]:
    """Every tensor an HF LLaMA checkpoint of these Preset fields holds, with its shape."""
    h, f, v = p["hidden_size"], p["ffn_hidden_size"], p["vocab_size"]
    hd = h // p["num_heads"]
    q, kv = p["num_heads"] * hd, p["num_query_groups"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (v, h)
    for i in range(p["num_layers"]):
        pre = f"model.layers.{i}."
        shapes.update({pre + "self_attn.q_proj.weight": (q, h), pre + "self_attn.k_proj.weight": (kv, h),
                       pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, q),
                       pre + "mlp.gate_proj.weight": (f, h), pre + "mlp.up_proj.weight": (f, h),
                       pre + "mlp.down_proj.weight": (h, f), pre + "input_layernorm.weight": (h,),
                       pre + "post_attention_layernorm.weight": (h,)})
    return shapes


class HFWeights:
    """An HF checkpoint's tensors: names and shapes without loading any, each tensor on demand."""

    def __init__(self, hf_dir: str):
        self.files, self.shapes, self._open = {}, {}, {}  # name -> file, name -> shape, file -> handle
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
            raise UsageError(f"unexpected tensor {sorted(names - expected.keys())[0]} (not a plain LLaMA checkpoint?)")
        for name, shape in expected.items():
            if self.shapes[name] != shape:
                raise UsageError(f"tensor {name} has shape {list(self.shapes[name])}, expected {list(shape)}")

    def __getitem__(self, name: str):
        path = self.files[name]
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(path, framework="pt")
        handle = self._open[path]
        return handle[name] if isinstance(handle, dict) else handle.get_tensor(name)


def hf_to_mcore_state(get, p: dict, tied: bool) -> dict:
    """Full (TP=1) megatron tensors from HF tensors (``get(name)``); vocab padded with zero rows."""
    import torch

    h, groups = p["hidden_size"], p["num_query_groups"]
    padded = -(-p["vocab_size"] // 128) * 128

    def pad(t):
        return torch.cat([t, t.new_zeros(padded - t.shape[0], t.shape[1])])

    state = {"embedding.word_embeddings.weight": pad(get("model.embed_tokens.weight")),
             "output_layer.weight": pad(get("model.embed_tokens.weight" if tied else "lm_head.weight")),
             "decoder.final_layernorm.weight": get("model.norm.weight")}
    for i in range(p["num_layers"]):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (get(f"{src}self_attn.{x}_proj.weight").reshape(groups, -1, h) for x in "qkv")
        state.update({
            dst + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, h),
            dst + "self_attention.linear_proj.weight": get(src + "self_attn.o_proj.weight"),
            dst + "mlp.linear_fc1.weight": torch.cat([get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight")]),
            dst + "mlp.linear_fc2.weight": get(src + "mlp.down_proj.weight"),
            dst + "input_layernorm.weight": get(src + "input_layernorm.weight"),
            dst + "pre_mlp_layernorm.weight": get(src + "post_attention_layernorm.weight")})
    return state


def mcore_to_hf_state(state: dict, p: dict) -> dict:
    """The inverse of hf_to_mcore_state: HF tensors (contiguous, padded vocab rows dropped)."""
    h, heads, groups, v = p["hidden_size"], p["num_heads"], p["num_query_groups"], p["vocab_size"]
    hd = h // heads
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:v],
           "lm_head.weight": state["output_layer.weight"][:v],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    for i in range(p["num_layers"]):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"].reshape(groups, -1, h)
        q, k, v_ = qkv.split([heads // groups * hd, hd, hd], dim=1)
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
        out.update({dst + "self_attn.q_proj.weight": q.reshape(-1, h), dst + "self_attn.k_proj.weight": k.reshape(-1, h),
                    dst + "self_attn.v_proj.weight": v_.reshape(-1, h),
                    dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
                    dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                    dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"],
                    dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
                    dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"]})
    return {k: t.detach().contiguous().clone() for k, t in out.items()}


def hf_config_from_meta(meta: dict) -> dict:
    """A transformers LlamaConfig dict: rope_parameters (new readers), rope_theta/rope_scaling (old ones)."""
    p, rope = meta["preset"], meta["rope"]
    if rope.get("log_scale_ref") is not None or rope.get("rotary_percent", 1.0) != 1.0:
        raise UsageError("log-scaled attention and partial rotary have no HF LLaMA equivalent; "
                         "export without them (they are load-time options)")
    params = {"rope_type": "default"}
    if rope.get("llama3_factor"):
        params = {"rope_type": "llama3", "factor": rope["llama3_factor"], **LLAMA3_DEFAULTS}
    elif rope.get("linear_factor"):
        params = {"rope_type": "linear", "factor": rope["linear_factor"]}
    elif rope.get("dynamic_ntk"):
        params = {"rope_type": "dynamic", "factor": rope.get("ntk_alpha", 1.0)}
    cfg = {k: v for k, v in (meta.get("hf_config") or {}).items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=p["vocab_size"],
               hidden_size=p["hidden_size"], intermediate_size=p["ffn_hidden_size"],
               num_hidden_layers=p["num_layers"], num_attention_heads=p["num_heads"],
               num_key_value_heads=p["num_query_groups"], head_dim=p["hidden_size"] // p["num_heads"],
               hidden_act="silu", max_position_embeddings=rope["train_len"], rms_norm_eps=p["norm_eps"],
               tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_theta=rope["base"],
               rope_parameters={"rope_theta": rope["base"], **params}, torch_dtype="float32", dtype="float32")
    if params["rope_type"] != "default":
        cfg["rope_scaling"] = params  # what transformers 4.x reads (5.x prefers it too when present)
    return cfg


def _check_destination(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"destination {path} already exists and is not empty; refusing to overwrite")


def _import_megatron_side():
    """Imported late: every input check above runs before torch and megatron load."""
    from megarope import checkpoint, model, parallel, rope

    return checkpoint, model, parallel, rope


def hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1) -> dict:
    """Convert an HF LLaMA directory into a megarope checkpoint; returns the checkpoint metadata."""
    _check_destination(out_dir)
    cfg = read_hf_config(hf_dir)
    preset_fields, rope_fields = hf_fields(cfg)
    for what, n in (("attention heads", preset_fields["num_heads"]), ("KV heads", preset_fields["num_query_groups"]),
                    ("FFN size", preset_fields["ffn_hidden_size"])):
        if n % tp:
            raise UsageError(f"--tp {tp} does not divide the model's {what} ({n})")
    tied = bool(cfg.get("tie_word_embeddings", False))
    weights = HFWeights(hf_dir)
    expected = hf_shapes(preset_fields, tied)
    if tied:  # a tied checkpoint may also store lm_head: it must equal the embedding, so it is not needed
        expected.update({k: weights.shapes[k] for k in ("lm_head.weight",) if k in weights.shapes})
    weights.check(expected)

    checkpoint, model_mod, parallel, rope_mod = _import_megatron_side()
    import torch

    parallel.init(tp=1)
    model = model_mod.build_model(model_mod.Preset(**preset_fields), rope_mod.RopeConfig(**rope_fields), "local")
    state = hf_to_mcore_state(lambda name: weights[name], preset_fields, tied)
    own = {k: t for k, t in model.state_dict().items() if not k.endswith("_extra_state")}
    assert own.keys() == state.keys(), sorted(own.keys() ^ state.keys())
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t)
    tokenizer = os.path.join(hf_dir, "tokenizer.model")
    tokenizer = tokenizer if os.path.isfile(tokenizer) else None
    meta = checkpoint.model_meta(model, tokenizer=tokenizer and "tokenizer.model", source="hf", hf_config=cfg,
                                 intended_tp=tp)
    checkpoint.save_model(model, out_dir, meta, tokenizer_file=tokenizer)
    return meta


def mcore_to_hf(ckpt_dir: str, out_dir: str) -> dict:
    """Export a megarope checkpoint as an HF LLaMA directory (fp32 model.safetensors); returns its config."""
    _check_destination(out_dir)
    if not os.path.isfile(os.path.join(ckpt_dir, "megarope.json")):
        raise UsageError(f"not a megarope checkpoint (no megarope.json): {ckpt_dir}")
    with open(os.path.join(ckpt_dir, "megarope.json")) as f:
        meta = json.load(f)
    cfg = hf_config_from_meta(meta)
    checkpoint, _, parallel, _ = _import_megatron_side()
    from safetensors.torch import save_file

    parallel.init(tp=1)
    model = checkpoint.build_from_checkpoint(ckpt_dir, backend="local")
    tensors = mcore_to_hf_state(model.state_dict(), meta["preset"])
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        tokenizer = os.path.join(ckpt_dir, meta.get("tokenizer") or "tokenizer.model")
        if os.path.isfile(tokenizer):  # a sentencepiece file inside the checkpoint, not a spec like "bytes"
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
    return cfg

"""Model presets and the builder: a LLaMA-style megatron-core GPTModel with megarope's spec.

We use GPTModel although megatron-core 0.19 logs it as deprecated in favour of HybridModel:
HybridModel builds attention and MLP as separate layers from a TE-only stack spec (it imports
Transformer Engine and Mamba modules), so it has no per-layer TransformerLayer spec to swap
a CPU attention into, and no RoPE scaling options. GPTModel keeps the layer spec as the seam.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megarope import spec
from megarope.rope import RopeConfig, rotary_embedding

VOCAB_MULTIPLE = 128  # padded vocab must not depend on TP, or checkpoints would not reshard


@dataclass(frozen=True)
class Preset:
    """A LLaMA-style decoder's shape: RMSNorm, SwiGLU, GQA, RoPE.

    The fields after max_seq_len are what the LLaMA, Mistral and Qwen2 families differ in; their
    defaults are LLaMA-2's, so metadata written before they existed still loads.
    kv_channels: the head dimension when it is not hidden_size / num_heads (megatron's name for it).
    tie_embeddings: the output layer shares the input embedding (megatron's
        share_embeddings_and_output_weights), as in Llama-3.2 1B/3B and small Qwen2 models.
    qkv_bias: biases on the query/key/value projections (Qwen2; megatron's add_qkv_bias).
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    kv_channels: int | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def num_params(self) -> int:
        """Parameters of the model as its HF checkpoint counts them (the unpadded vocabulary)."""
        h, v = self.hidden_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_query_groups * self.head_dim
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias
        layer = attention + 3 * h * self.ffn_hidden_size + 2 * h  # SwiGLU's three matrices, two norms
        return v * h * (1 if self.tie_embeddings else 2) + self.num_layers * layer + h

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "llama2-7b": Preset(num_layers=32, hidden_size=4096, num_heads=32, num_query_groups=32, ffn_hidden_size=11008,
                        vocab_size=32000, max_seq_len=4096),
    "llama2-13b": Preset(num_layers=40, hidden_size=5120, num_heads=40, num_query_groups=40, ffn_hidden_size=13824,
                         vocab_size=32000, max_seq_len=4096),
    # TinyLlama's 1.1B shape: GQA with 4 KV groups, small enough for 1M-token eval on one GPU.
    "llama-1b": Preset(num_layers=22, hidden_size=2048, num_heads=32, num_query_groups=4, ffn_hidden_size=5632,
                       vocab_size=32000, max_seq_len=2048),
    # The toy-scale experiment's shape (head dim 32), byte tokens + EOD; trains on a CPU in minutes.
    "toy": Preset(num_layers=4, hidden_size=128, num_heads=4, num_query_groups=2, ffn_hidden_size=352,
                  vocab_size=257, max_seq_len=128),
}


def get_preset(name: str, **overrides) -> Preset:
    from megarope.errors import UsageError

    if name not in PRESETS:
        raise UsageError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def transformer_config(preset: Preset, backend: str = "local", **kwargs) -> TransformerConfig:
    """The megatron TransformerConfig of a LLaMA decoder: RMSNorm, SwiGLU, GQA, no biases but Qwen2's on q/k/v."""
    return TransformerConfig(**transformer_config_kwargs(preset, backend, **kwargs))


def transformer_config_kwargs(preset: Preset, backend: str = "local", dtype: torch.dtype = torch.float32,
                              sequence_parallel: bool = False, recompute: bool = False,
                              fp8: str | None = None, fp8_recipe: str = "delayed") -> dict:
    if backend not in spec.BACKENDS:
        raise ValueError(f"backend must be one of {spec.BACKENDS}, got {backend!r}")
    if fp8 and backend != "te":
        raise ValueError("FP8 needs the Transformer Engine backend (backend: te)")
    return dict(
        num_layers=preset.num_layers, hidden_size=preset.hidden_size, num_attention_heads=preset.num_heads,
        num_query_groups=preset.num_query_groups, ffn_hidden_size=preset.ffn_hidden_size,
        kv_channels=preset.head_dim, normalization="RMSNorm", layernorm_epsilon=preset.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=preset.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=backend == "te",
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1,
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=dtype,
        bf16=dtype == torch.bfloat16, init_method_std=0.02,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None, recompute_num_layers=1 if recompute else None,
        fp8=fp8, fp8_recipe=fp8_recipe if fp8 else "delayed",
    )


def build_model(preset: Preset, rope: RopeConfig, backend: str = "local", **config_kwargs) -> GPTModel:
    """A GPTModel on this rank's device, for the parallel state already initialized."""
    config = transformer_config(preset, backend, **config_kwargs)
    for name, value in (rope.yarn.megatron_config() if rope.yarn else {}).items():
        setattr(config, name, value)  # read with getattr by megatron's attention (the YaRN temperature)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)  # see module docstring
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec.block_spec(backend, rope, preset.num_layers),
        vocab_size=preset.padded_vocab_size,
        max_sequence_length=preset.max_seq_len,
        position_embedding_type="rope",
        rotary_base=rope.base,
        rotary_percent=rope.rotary_percent,
        share_embeddings_and_output_weights=preset.tie_embeddings,
        parallel_output=True,
    )
    # megarope's rotary table: dynamic NTK by global length, CP slicing without CUDA assumptions.
    model.rotary_pos_emb = rotary_embedding(rope, preset.head_dim, parallel_state.get_context_parallel_group())
    if rope.yarn is not None:
        # GPTModel's "yarn" forward path, with our table: built as "yarn", GPTModel would make its own
        # table first and slice it for CP with pinned CUDA memory, which fails without a GPU.
        model.position_embedding_type = "yarn"
    model.megarope_preset, model.megarope_rope, model.megarope_backend = preset, rope, backend
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

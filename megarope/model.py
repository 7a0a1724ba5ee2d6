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
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

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
    # Llama-2-70B: GQA with 8 KV groups (head dim 128).
    "llama2-70b": Preset(num_layers=80, hidden_size=8192, num_heads=64, num_query_groups=8, ffn_hidden_size=28672,
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
                              fp8: str | None = None, fp8_recipe: str = "tensorwise") -> dict:
    if backend not in spec.BACKENDS:
        raise ValueError(f"backend must be one of {spec.BACKENDS}, got {backend!r}")
    if fp8 and backend != "te":
        raise ValueError("FP8 needs the Transformer Engine backend (backend: te)")
    virtual = parallel_state.get_virtual_pipeline_model_parallel_world_size()
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
        virtual_pipeline_model_parallel_size=virtual,
        pipeline_dtype=dtype,  # what the stages send each other
        # Interleaved stages exchange activations and gradients with the same neighbour at once; batched
        # isend/irecv then pairs them by order alone and, over gloo, mixes them up (seen: wrong losses from
        # the third micro batch on). Separate sends, as megatron's training configures interleaving, do not.
        overlap_p2p_comm=virtual is not None, batch_p2p_comm=virtual is None,
        sequence_parallel=sequence_parallel and parallel_state.get_tensor_model_parallel_world_size() > 1,
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=dtype,
        bf16=dtype == torch.bfloat16, init_method_std=0.02,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None, recompute_num_layers=1 if recompute else None,
        fp8=fp8, fp8_recipe=fp8_recipe if fp8 else "delayed",
    )


def pipeline_split(num_layers: int, pp: int, vpp: int | None = None) -> int:
    """Layers per (virtual) pipeline stage: an even split, or ValueError naming the sizes."""
    stages = pp * (vpp or 1)
    if num_layers % stages:
        what = f"PP x VPP = {pp} x {vpp} = {stages}" if vpp else f"PP = {pp}"
        raise ValueError(f"{num_layers} layers cannot be split evenly over {what} pipeline stages")
    return num_layers // stages


def build_model(preset: Preset, rope: RopeConfig, backend: str = "local", **config_kwargs) -> GPTModel:
    """This rank's GPTModel (its pipeline stage) on its device, for the parallel state already initialized.

    With pipeline parallelism each stage builds its share of the layers (split evenly; megatron
    numbers them globally, so checkpoints load at any PP); the embedding lives on the first stage,
    the final norm, output layer and megarope's chunked loss (loss.token_losses) on the last. With
    virtual stages use build_model_chunks.
    """
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None:
        raise ValueError("the layout has virtual pipeline stages: build them with build_model_chunks")
    return build_model_chunks(preset, rope, backend, **config_kwargs)[0]


def build_model_chunks(preset: Preset, rope: RopeConfig, backend: str = "local", **config_kwargs) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one without virtual stages)."""
    pipeline_split(preset.num_layers, parallel_state.get_pipeline_model_parallel_world_size(),
                   parallel_state.get_virtual_pipeline_model_parallel_world_size())
    config = transformer_config(preset, backend, **config_kwargs)
    for name, value in (rope.yarn.megatron_config() if rope.yarn else {}).items():
        setattr(config, name, value)  # read with getattr by megatron's attention (the YaRN temperature)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)  # see module docstring
    layer = spec.layer_spec(backend, rope)
    init_state = torch.get_rng_state()
    chunks = []
    for vp_stage in range(config.virtual_pipeline_model_parallel_size or 1):
        vp_stage = vp_stage if config.virtual_pipeline_model_parallel_size else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        if config.use_cpu_initialization:
            torch.set_rng_state(init_state)
            _draw_earlier_stages(config, layer, preset, vp_stage, first)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec.block_spec(backend, rope, get_num_layers_to_build(config, vp_stage)),
            vocab_size=preset.padded_vocab_size,
            max_sequence_length=preset.max_seq_len,
            pre_process=first,
            post_process=last,
            position_embedding_type="rope",
            rotary_base=rope.base,
            rotary_percent=rope.rotary_percent,
            share_embeddings_and_output_weights=preset.tie_embeddings,
            parallel_output=True,
            vp_stage=vp_stage,
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
        chunks.append(model)
    return chunks


def _draw_earlier_stages(config: TransformerConfig, layer, preset: Preset, vp_stage: int | None, first: bool) -> None:
    """Advance the CPU generator past the weights that the stages before this one draw.

    With CPU initialization (no GPU) every layout starts from the same weights, as with PP = 1:
    GPTModel draws the embedding, then each layer, then the output layer, from the CPU generator.
    A later stage first builds and drops what comes before it (megatron's own modules, so the draws
    are exactly theirs). CPU-only, so the extra work is at the scale of CPU models.
    """
    if not first:
        LanguageModelEmbedding(config=config, vocab_size=preset.padded_vocab_size,
                               max_sequence_length=preset.max_seq_len, position_embedding_type="rope")
    for number in range(1, get_transformer_layer_offset(config, vp_stage) + 1):
        build_module(layer, config=config, layer_number=number, vp_stage=vp_stage)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

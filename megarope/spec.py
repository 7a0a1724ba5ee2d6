"""Layer specs for a LLaMA-style decoder (RMSNorm, SwiGLU, GQA; no biases but Qwen2's optional q/k/v ones,
which megatron's attention adds from the config's add_qkv_bias) -- the seam where megarope swaps behaviour
into megatron-core.

backend "te":    Transformer Engine modules; TE's attention does context parallelism itself.
                 RoPE stays fused in TE: the paper's per-position variants live elsewhere
                 (dynamic NTK in the rotary table, log-scaling in a thin wrapper over TE's core
                 attention), so nothing forces the unfused path.
backend "local": megatron-core's own linear layers, a sequence-parallel-aware RMSNorm, and
                 megarope's ContextParallelAttention (CP over any torch.distributed backend).
Both backends lay out their checkpoints the same way, so a model trained on one loads on the other.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megarope.attention import ContextParallelAttention, log_scaled_te_attention
from megarope.rope import RopeConfig

BACKENDS = ("te", "local")

# The local layout names its norms as TE's fused norm+linear modules do, so checkpoints match.
_LOCAL_TO_TE_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                     "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built the way megatron builds norms, and sequence-parallel aware.

    Under sequence parallelism each TP rank sees a different slice of the sequence, so the norm
    weight's gradient must be summed over TP: megatron does that for parameters marked
    ``sequence_parallel``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


def te_modules() -> dict:
    """Transformer Engine's classes, imported only when the "te" backend is asked for."""
    from megatron.core.extensions.transformer_engine import (TEDotProductAttention, TELayerNormColumnParallelLinear,
                                                             TENorm, TERowParallelLinear)

    return {"norm_linear": TELayerNormColumnParallelLinear, "row_linear": TERowParallelLinear,
            "core_attention": TEDotProductAttention, "norm": TENorm}


def _mlp(fc1, fc2):
    """SwiGLU MLP, built through the classmethod megatron-core 0.19 asks layer specs to use."""
    return functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2))


def layer_spec(backend: str, rope: RopeConfig) -> ModuleSpec:
    """The megatron-core TransformerLayer spec for one LLaMA decoder layer."""
    if backend == "te":
        te = te_modules()
        attention = te["core_attention"]
        if rope.log_scale_ref is not None:
            attention = ModuleSpec(module=log_scaled_te_attention(attention), params={"rope": rope})
        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=te["norm_linear"], core_attention=attention,
                                          linear_proj=te["row_linear"], q_layernorm=IdentityOp,
                                          k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            mlp=_mlp(te["norm_linear"], te["row_linear"]),
            mlp_bda=get_bias_dropout_add,
        ))
    if backend == "local":
        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=ColumnParallelLinear,
                                          core_attention=ModuleSpec(module=ContextParallelAttention,
                                                                    params={"rope": rope}),
                                          linear_proj=RowParallelLinear, q_layernorm=IdentityOp,
                                          k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=_mlp(ColumnParallelLinear, RowParallelLinear),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=_LOCAL_TO_TE_KEYS,
        ))
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def block_spec(backend: str, rope: RopeConfig, num_layers: int) -> ModuleSpec:
    """The decoder: ``num_layers`` of :func:`layer_spec` and the final norm of the backend."""
    final_norm = te_modules()["norm"] if backend == "te" else RMSNorm
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer_spec(backend, rope)] * num_layers, layer_norm=final_norm))

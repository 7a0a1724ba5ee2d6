"""Which modules each backend's spec picks; the TE spec is checked without importing TE."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from megarope import parallel, spec
from megarope.attention import ContextParallelAttention
from megarope.model import get_preset, transformer_config, transformer_config_kwargs
from megarope.rope import RopeConfig


class FakeTEAttention(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()


FAKE_TE = {"norm_linear": type("TELayerNormColumnParallelLinear", (), {}),
           "row_linear": type("TERowParallelLinear", (), {}),
           "core_attention": FakeTEAttention, "norm": type("TENorm", (), {})}


@pytest.fixture
def fake_te(monkeypatch):
    monkeypatch.setattr(spec, "te_modules", lambda: FAKE_TE)


def _attention(layer):
    return layer.submodules.self_attention.submodules


def test_te_spec_uses_te_modules(fake_te):
    layer = spec.layer_spec("te", RopeConfig(base=1e6))
    attn = _attention(layer)
    assert attn.linear_qkv is FAKE_TE["norm_linear"] and attn.linear_proj is FAKE_TE["row_linear"]
    assert attn.core_attention is FakeTEAttention  # plain TE attention: TE does CP itself
    assert layer.submodules.input_layernorm is IdentityOp  # the norm is fused into linear_qkv
    mlp = layer.submodules.mlp.keywords["submodules"]
    assert mlp.linear_fc1 is FAKE_TE["norm_linear"] and mlp.linear_fc2 is FAKE_TE["row_linear"]
    assert spec.block_spec("te", RopeConfig(), 3).submodules.layer_norm is FAKE_TE["norm"]


def test_te_spec_wraps_attention_for_log_scaling(fake_te):
    rope = RopeConfig(base=500.0, log_scale_ref=4096)
    core = _attention(spec.layer_spec("te", rope)).core_attention
    assert issubclass(core.module, FakeTEAttention) and core.params == {"rope": rope}


def test_local_spec_uses_megarope_attention_and_norms():
    rope = RopeConfig(base=1e6)
    layer = spec.layer_spec("local", rope)
    attn = _attention(layer)
    assert attn.linear_qkv is ColumnParallelLinear and attn.linear_proj is RowParallelLinear
    assert attn.core_attention.module is ContextParallelAttention and attn.core_attention.params["rope"] is rope
    assert layer.submodules.input_layernorm is spec.RMSNorm
    # same checkpoint keys as the TE layout
    assert layer.submodules.sharded_state_dict_keys_map["input_layernorm."] == "self_attention.linear_qkv.layer_norm_"
    blocks = spec.block_spec("local", rope, 4).submodules
    assert len(blocks.layer_specs) == 4 and blocks.layer_norm is spec.RMSNorm


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        spec.layer_spec("xla", RopeConfig())


def test_rope_fusion_only_on_te():
    parallel.init()
    assert transformer_config_kwargs(get_preset("toy"), "te")["apply_rope_fusion"]
    assert not transformer_config_kwargs(get_preset("toy"), "local")["apply_rope_fusion"]


def test_rmsnorm_marks_weight_for_sequence_parallel():
    parallel.init()
    config = transformer_config(get_preset("toy"), "local")
    config.sequence_parallel = True
    assert spec.RMSNorm(config, 16).weight.sequence_parallel

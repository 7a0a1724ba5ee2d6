import math

import pytest
import torch

from megarope import parallel
from megarope import rope as R


class FakeGroup:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def test_config_checks():
    with pytest.raises(ValueError, match="base"):
        R.RopeConfig(base=1.0)
    with pytest.raises(ValueError, match="log_scale_ref"):
        R.RopeConfig(log_scale_ref=1)


def test_dynamic_ntk_base():
    assert R.dynamic_ntk_base(1e4, 4096, 4096, 128) == 1e4
    assert R.dynamic_ntk_base(1e4, 8192, 4096, 128) == pytest.approx(1e4 * 2 ** (128 / 126))
    assert R.dynamic_ntk_base(1e4, 8192, 4096, 128, alpha=2) == pytest.approx(1e4 * 3 ** (128 / 126))


def test_log_scale_factors():
    f = R.log_scale_factors(torch.tensor([0, 15, 16, 255]), 16)
    assert f[:2].tolist() == [1.0, 1.0]
    assert f[2].item() == pytest.approx(math.log(17) / math.log(16))
    assert f[3].item() == pytest.approx(2.0)


def _table(rope, length, group=None):
    emb = R.RotaryEmbedding(rope, kv_channels=32, cp_group=group)
    return emb(length)


def test_rotary_table_under_cp_is_the_slice_of_the_full_table():
    rope = R.RopeConfig(base=500.0, train_len=16, dynamic_ntk=True)
    full = _table(rope, 64)
    for rank in range(2):
        local = _table(rope, 64, FakeGroup(2, rank))
        assert torch.equal(local, full[parallel.cp_local_positions(64, 2, rank)])


@pytest.mark.parametrize("length", [64, 128, 300])
def test_dynamic_ntk_equals_transformers_dynamic_rope(length):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=64,
                         rope_parameters={"rope_type": "dynamic", "factor": 1.0, "rope_theta": 500.0})
    hf = LlamaRotaryEmbedding(config)
    positions = torch.arange(length)[None]
    cos, sin = hf(torch.zeros(1, length, 128), positions)
    ours = _table(R.RopeConfig(base=500.0, train_len=64, dynamic_ntk=True), length)[:, 0, 0, :]
    torch.testing.assert_close(torch.cos(ours), cos[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.sin(ours), sin[0], atol=1e-5, rtol=1e-5)


def test_plain_table_matches_megatron():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    ref = RotaryEmbedding(kv_channels=32, rotary_percent=1.0, rotary_base=1e6, use_cpu_initialization=True)
    expected = torch.cat([ref.get_freqs_non_repeated(50)] * 2, dim=-1)[:, None, None, :]
    assert torch.allclose(_table(R.RopeConfig(base=1e6), 50), expected)

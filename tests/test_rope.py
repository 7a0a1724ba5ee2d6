import json
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


def test_scalings_do_not_combine():
    with pytest.raises(ValueError, match="one RoPE scaling at a time"):
        R.RopeConfig(linear_factor=2.0, yarn={"factor": 4.0, "original_len": 64})
    with pytest.raises(ValueError, match="dynamic NTK .* llama3_factor"):
        R.RopeConfig(dynamic_ntk=True, llama3_factor=8.0)
    with pytest.raises(ValueError, match="rotary_percent must be 1 with yarn"):
        R.RopeConfig(rotary_percent=0.5, yarn={"factor": 4.0, "original_len": 64})


def test_yarn_config_reads_back_from_json():
    from dataclasses import asdict

    rope = R.RopeConfig(base=1e4, yarn=R.Yarn(factor=4.0, original_len=64, mscale=0.707, mscale_all_dim=0.5))
    again = R.RopeConfig(**json.loads(json.dumps(asdict(rope))))
    assert again == rope and isinstance(again.yarn, R.Yarn) and hash(again) == hash(rope)
    assert R.RopeConfig(**{k: v for k, v in asdict(R.RopeConfig()).items() if k != "yarn"}).yarn is None  # old metadata


def _hf_rotary(length, **rope_parameters):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                         rope_parameters=rope_parameters)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, length, 128), torch.arange(length)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("params", [
    {"factor": 4.0, "original_max_position_embeddings": 64},
    {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.5},
], ids=["default", "betas-untruncated", "mscale"])
def test_yarn_table_and_temperature_equal_transformers(params):
    """megatron's YaRN frequencies through megarope's table, times megatron's temperature = transformers' cos/sin."""
    from megarope import compat

    compat.apply()  # megatron's YaRN table goes to torch.cuda.current_device(), as parallel.init arranges
    yarn = R.Yarn(factor=params["factor"], original_len=params["original_max_position_embeddings"],
                  beta_fast=params.get("beta_fast", 32), beta_slow=params.get("beta_slow", 1),
                  mscale=params.get("mscale", 1.0), mscale_all_dim=params.get("mscale_all_dim", 0.0),
                  truncate=params.get("truncate", True))
    table = R.rotary_embedding(R.RopeConfig(base=500.0, yarn=yarn), kv_channels=32)
    angles, temperature = table(200)
    assert temperature == pytest.approx(yarn.attention_factor, rel=1e-12) and temperature > 1
    cos, sin = _hf_rotary(200, rope_type="yarn", rope_theta=500.0, **params)
    torch.testing.assert_close(torch.cos(angles[:, 0, 0]) * temperature, cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.sin(angles[:, 0, 0]) * temperature, sin, atol=1e-5, rtol=1e-5)
    for rank in range(2):  # CP: this rank's positions of the same table
        local, _ = R.YarnRotaryEmbedding(R.RopeConfig(base=500.0, yarn=yarn), 32, FakeGroup(2, rank))(200)
        assert torch.equal(local, angles[parallel.cp_local_positions(200, 2, rank)])


def test_llama3_scaling_with_all_four_numbers_equals_transformers():
    rope = R.RopeConfig(base=5e5, llama3_factor=8.0, llama3_low_freq_factor=2.0, llama3_high_freq_factor=8.0,
                        llama3_original_len=64)
    angles = _table(rope, 200)[:, 0, 0]
    cos, sin = _hf_rotary(200, rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=2.0,
                          high_freq_factor=8.0, original_max_position_embeddings=64)
    torch.testing.assert_close(torch.cos(angles), cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.sin(angles), sin, atol=1e-5, rtol=1e-5)


def test_describe():
    assert R.RopeConfig(base=5e5, llama3_factor=8.0).describe() == "base 500000, Llama-3 scaling x8"
    assert "YaRN x4 from 64 (attention factor 1.139)" in R.RopeConfig(yarn={"factor": 4.0, "original_len": 64}).describe()


def _documents(lengths: list[int]):
    """One row of documents of these lengths, positions restarting at each, as packing lays them out (local)."""
    from megarope.packing import Documents

    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    spans = torch.cat([torch.full((n,), n) for n in lengths])[None]
    total = sum(lengths)
    return Documents(qkv_format="sbhd", max_seqlen_q=total, max_seqlen_kv=total, separate=True,
                     positions=positions, lengths=spans, table_lengths=tuple(sorted(set(lengths))))


@pytest.mark.parametrize("rope", [R.RopeConfig(base=500.0, train_len=16, dynamic_ntk=True, log_scale_ref=16),
                                  R.RopeConfig(base=1e4, linear_factor=2.0),
                                  R.RopeConfig(base=500.0, yarn={"factor": 4.0, "original_len": 16})],
                         ids=["dynamic-ntk", "linear", "yarn"])
def test_a_document_packed_with_others_gets_the_table_it_gets_alone(rope):
    """GPTModel asks for the length with the micro batch's packed-sequence parameters, then for the table: with
    packed documents each token gets the row of its own position, from its own document's table (dynamic NTK's
    base from its length); the next call, without documents, gets megatron's table again."""
    from megarope import compat

    compat.apply()
    lengths = [20, 9, 35]
    table = R.rotary_embedding(rope, kv_channels=32)

    def angles(length):
        out = table(length)
        return (out[0] if isinstance(out, tuple) else out)[:, 0, 0]

    documents = _documents(lengths)
    assert table.get_rotary_seq_len(None, None, None, None, documents) == 64
    packed = table(64)
    packed = packed[0] if isinstance(packed, tuple) else packed
    assert packed.shape == (64, 1, 1, 32)
    start = 0
    for n in lengths:
        assert torch.equal(packed[start:start + n, 0, 0], angles(n))
        start += n
    assert torch.equal(angles(64), angles(64)) and not torch.equal(angles(64)[20:29], packed[20:29, 0, 0])
    from types import SimpleNamespace

    config = SimpleNamespace(sequence_parallel=False, tensor_model_parallel_size=1, context_parallel_size=1)
    assert table.get_rotary_seq_len(None, None, torch.zeros(64, 1, 8), config, None) == 64  # nothing packed
    again = table(64)
    assert torch.equal(again[0] if isinstance(again, tuple) else again, angles(64)[:, None, None])

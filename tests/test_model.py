"""TP=2 with sequence parallel, and CP=2, give one process's loss and gradients (gloo, 2 processes)."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from megarope import loss as L
from megarope import model as M
from megarope import parallel
from megarope import rope as R
from megarope.rope import RopeConfig

SEQ = 128
ROPES = {
    "base 1e6": RopeConfig(base=1e6, train_len=64),
    "dynamic NTK + log-scaled": RopeConfig(base=500.0, train_len=64, dynamic_ntk=True, log_scale_ref=32),
}


def _batch():
    tokens = torch.randint(0, 257, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous()}


def _full_grad(name, param, tp_group, tp):
    """Reassemble a TP-sharded gradient into the single-process layout."""
    grad = param.grad
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return grad
    shards = [torch.empty_like(grad) for _ in range(tp)]
    dist.all_gather(shards, grad.contiguous(), group=tp_group)
    if name.endswith("mlp.linear_fc1.weight"):  # SwiGLU: each shard holds [gate_i; up_i]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=param.partition_dim)


def loss_and_grads(tp=1, cp=1, sp=False):
    from megatron.core import parallel_state

    parallel.init(tp=tp, cp=cp)
    out = {}
    for label, rope in ROPES.items():
        parallel.seed_everything(1234)
        model = M.build_model(M.get_preset("toy"), rope, sequence_parallel=sp)
        batch = parallel.slice_for_cp(_batch())
        losses, _ = L.token_losses(model, batch["tokens"], batch["labels"], batch["position_ids"])
        loss, _ = L.mean_loss(losses, torch.ones_like(losses))
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = _full_grad(name, p, parallel_state.get_tensor_model_parallel_group(), tp)
            if sp and getattr(p, "sequence_parallel", False):  # what finalize_model_grads does
                g = g.clone()
                dist.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
            if cp > 1:  # what DDP does over the DP x CP group: average
                g = g.clone()
                dist.all_reduce(g, group=parallel_state.get_context_parallel_group())
                g /= cp
            grads[name] = g.detach().clone()
        loss = loss.detach().clone()
        if cp > 1:
            dist.all_reduce(loss, group=parallel_state.get_context_parallel_group())
            loss /= cp
        out[label] = (loss.item(), grads)
    return out


@pytest.fixture(scope="module")
def reference():
    try:
        return loss_and_grads()
    finally:
        parallel.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tp=2, sp=True), dict(cp=2)], ids=["tp2-sp", "cp2"])
def test_parallel_layout_matches_one_process(reference, layout):
    results = run_distributed(loss_and_grads, 2, **layout)
    for rank_result in results:
        for label, (loss, grads) in rank_result.items():
            ref_loss, ref_grads = reference[label]
            assert loss == pytest.approx(ref_loss, abs=1e-5), label
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-4, msg=f"{label}: {name}")


def test_presets_have_the_published_shapes():
    seven = M.get_preset("llama2-7b")
    assert (seven.num_layers, seven.hidden_size, seven.head_dim, seven.ffn_hidden_size) == (32, 4096, 128, 11008)
    assert M.get_preset("llama2-13b").head_dim == 128
    assert M.get_preset("toy").head_dim == 32
    assert M.get_preset("toy").padded_vocab_size == 384


def test_unknown_preset_is_a_usage_error():
    from megarope.errors import UsageError

    with pytest.raises(UsageError, match="unknown model preset"):
        M.get_preset("gpt5")


def test_toy_model_is_about_a_million_parameters():
    parallel.init()
    model = M.build_model(M.get_preset("toy"), RopeConfig(base=1e4, train_len=128))
    assert 0.7e6 < M.count_parameters(model) < 1.2e6


def test_fp8_needs_te_backend():
    parallel.init()
    with pytest.raises(ValueError, match="Transformer Engine"):
        M.transformer_config(M.get_preset("toy"), "local", fp8="e4m3")


def test_num_params_counts_as_published():
    assert M.get_preset("llama2-7b").num_params() == 6_738_415_616
    assert M.get_preset("llama-1b").num_params() == 1_100_048_384  # TinyLlama-1.1B


def test_metadata_from_before_the_family_fields_loads():
    old = {"num_layers": 4, "hidden_size": 128, "num_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 352,
           "vocab_size": 257, "max_seq_len": 128, "norm_eps": 1e-5}
    preset = M.Preset(**old)
    assert preset == M.get_preset("toy") and not preset.tie_embeddings and not preset.qkv_bias
    assert preset.kv_channels is None and preset.head_dim == 32


@pytest.mark.parametrize("fields", [dict(tie_embeddings=True), dict(qkv_bias=True), dict(kv_channels=48)],
                         ids=["tied", "qkv-bias", "head-dim-48"])
def test_family_fields_build_what_num_params_counts(fields):
    parallel.init()
    preset = M.Preset(num_layers=2, hidden_size=64, num_heads=4, num_query_groups=2, ffn_hidden_size=128,
                      vocab_size=256, max_seq_len=128, **fields)  # a vocabulary megarope need not pad
    model = M.build_model(preset, RopeConfig())
    assert M.count_parameters(model) == preset.num_params()
    names = dict(model.named_parameters())
    assert ("output_layer.weight" in names) == (not preset.tie_embeddings)
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in names) == preset.qkv_bias
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0] == (4 + 2 * 2) * preset.head_dim


def test_yarn_model_takes_megatron_yarn_path():
    parallel.init()
    rope = RopeConfig(yarn={"factor": 4.0, "original_len": 32})
    model = M.build_model(M.get_preset("toy"), rope)
    assert model.position_embedding_type == "yarn" and isinstance(model.rotary_pos_emb, R.YarnRotaryEmbedding)
    assert model.config.yarn_rotary_scaling_factor == 4.0  # where megatron's attention reads the temperature from
    tokens = torch.randint(0, 257, (1, 64))
    assert model(tokens, torch.arange(64)[None], None).shape == (1, 64, 384)


def test_llama2_70b_preset_has_the_published_shape():
    p = M.get_preset("llama2-70b")
    assert (p.num_layers, p.hidden_size, p.num_heads, p.num_query_groups, p.ffn_hidden_size) == (80, 8192, 64, 8, 28672)
    assert (p.vocab_size, p.max_seq_len, p.head_dim, p.padded_vocab_size) == (32000, 4096, 128, 32000)


def test_pipeline_split_is_even_or_refused():
    assert M.pipeline_split(80, 4) == 20 and M.pipeline_split(80, 4, 2) == 10
    with pytest.raises(ValueError, match="4 layers cannot be split evenly over PP = 3 pipeline stages"):
        M.pipeline_split(4, 3)
    with pytest.raises(ValueError, match=r"PP x VPP = 2 x 4 = 8"):
        M.pipeline_split(4, 2, 4)


def test_recompute_gives_the_same_gradients_and_reruns_each_layer_on_a_cpu():
    """megatron's full activation recompute (tensor_parallel.checkpoint) on a CPU: each layer's forward runs again in
    the backward pass, and the gradients equal those without recompute (compat gives its RNG save/restore a CPU path)."""
    parallel.init()
    tokens = torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(0))
    grads, forwards = {}, {}
    for recompute in (False, True):
        parallel.seed_everything(1234)
        model = M.build_model(M.get_preset("toy"), RopeConfig(base=1e4, train_len=64), recompute=recompute)
        calls = []
        model.decoder.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
        losses, _ = L.token_losses(model, tokens[:, :-1], tokens[:, 1:])
        losses.mean().backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters()}
        forwards[recompute] = len(calls)
    assert forwards == {False: 1, True: 2}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=0, rtol=0, msg=name)

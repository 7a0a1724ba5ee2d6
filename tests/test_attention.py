"""megarope's core attention: the fused kernels and their log-sum-exp merge against plain softmax
attention; CP=2 and CP=4 (all-gather and ring) against one process, forward and backward, in the
attention alone and in the whole model (with log-scaled queries and dynamic NTK); training at CP=2
against CP=1; the one-line refusals."""

import json
import math
import os
import sysconfig
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from megarope import attention as A
from megarope import parallel
from megarope.parallel import cp_local_positions
from megarope.rope import RopeConfig

S, B, H, HK, D = 48, 2, 4, 2, 8


def reference(q, k, v, t_ref=None):
    """Plain softmax attention: [s, b, h, d] in, [s, b, h*d] out; causal, GQA, log-scaled queries."""
    s = q.shape[0]
    if t_ref is not None:
        t = torch.arange(1, s + 1, dtype=torch.float64)
        q = q * torch.clamp(torch.log(t) / math.log(t_ref), min=1).to(q.dtype)[:, None, None, None]
    k, v = (x.repeat_interleave(H // HK, dim=2) for x in (k, v))
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v).reshape(s, B, H * D)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(S, B, n, D, generator=g, dtype=torch.float64) for n in (H, HK, HK)]


def make_core(rope, cp, comm="auto"):
    config = SimpleNamespace(attention_dropout=0.0, kv_channels=D, context_parallel_size=cp)
    core = torch.nn.Module.__new__(A.ContextParallelAttention)
    torch.nn.Module.__init__(core)
    core.rope, core.softmax_scale, core.cp_comm = rope, D ** -0.5, comm
    core.cp_group = parallel.cp_group() if cp > 1 else None
    core.config = config
    return core


# ----------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("t_ref", [None, 16])
def test_one_process_matches_reference(t_ref):
    q, k, v = _inputs()
    out = make_core(RopeConfig(log_scale_ref=t_ref), 1)(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v, t_ref))


def test_kernel_parts_merged_by_lse_equal_one_softmax_forward_and_backward():
    """Queries of the last 16 positions: keys 0..31 unmasked + their own 16 causally, merged by LSE, and
    each part's backward from the merged output and LSE, add up to attention over all 48 keys."""
    q, k, v = (x.permute(1, 2, 0, 3) for x in _inputs())  # [b, h, s, d] views, as the CP core passes them
    scale = D ** -0.5
    out, lse = A.attention_with_lse(q, k, v, True, scale)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    torch.testing.assert_close(out, whole)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(H // HK, 1)) * scale
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1))

    rows = slice(32, 48)
    merged, merged_lse = A.attention_with_lse(q[:, :, rows], k[:, :, :32], v[:, :, :32], False, scale)
    diag, diag_lse = A.attention_with_lse(q[:, :, rows], k[:, :, rows], v[:, :, rows], True, scale)
    A.merge_parts(merged, merged_lse, diag, diag_lse)
    torch.testing.assert_close(merged, whole[:, :, rows])
    torch.testing.assert_close(merged_lse, lse[:, :, rows])

    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale,
                                                     enable_gqa=True).backward(grad)
    g = grad[:, :, rows]
    dq1, dk1, dv1 = A.attention_with_lse_backward(g, q[:, :, rows], k[:, :, :32], v[:, :, :32], merged,
                                                  merged_lse, False, scale)
    dq2, dk2, dv2 = A.attention_with_lse_backward(g, q[:, :, rows], k[:, :, rows], v[:, :, rows], merged,
                                                  merged_lse, True, scale)
    torch.testing.assert_close(dq1 + dq2, leaves[0].grad[:, :, rows])
    # the keys 32..47 are seen only by these queries: their gradient is complete
    torch.testing.assert_close(dk2, leaves[1].grad[:, :, rows])
    torch.testing.assert_close(dv2, leaves[2].grad[:, :, rows])


def test_refusals():
    config = SimpleNamespace(attention_dropout=0.1, kv_channels=D, context_parallel_size=1)
    with pytest.raises(ValueError, match="dropout"):
        A.ContextParallelAttention(config, 1, None, "self")
    config.attention_dropout = 0.0
    with pytest.raises(ValueError, match="all_gather or p2p, not 'a2a'"):
        A.ContextParallelAttention(config, 1, None, "self", cp_comm_type="a2a")
    assert A.ContextParallelAttention(config, 1, None, "self", cp_comm_type="p2p").cp_comm == "ring"
    assert A.resolve_cp_comm("auto", A.RING_ABOVE_CP) == "all-gather"
    assert A.resolve_cp_comm("auto", A.RING_ABOVE_CP + 1) == "ring"
    with pytest.raises(ValueError, match="cp_comm must be one of"):
        A.set_cp_comm(torch.nn.Linear(1, 1), "alltoall")


# ----------------------------------------------------------------------------------------------- under CP
def _attention_at(cp):
    """Every (log-scaling, K/V passing) case at this CP: this rank's positions, outputs and input gradients."""
    parallel.init(cp=cp)
    mine = cp_local_positions(S, cp, dist.get_rank(parallel.cp_group()))
    results = {}
    for t_ref in (None, 16):
        for comm in ("all-gather", "ring"):
            local = [x[mine].clone().requires_grad_() for x in _inputs()]
            out = make_core(RopeConfig(log_scale_ref=t_ref), cp, comm)(*local)
            out.square().sum().backward()
            results[t_ref, comm] = (out.detach(), [x.grad for x in local])
    with pytest.raises(ValueError, match="two equal chunks"):
        A.context_parallel_attention(*(x[:3] for x in _inputs()), parallel.cp_group(), 1.0)
    return mine, results


MODEL_ROPES = {"plain": {}, "log-scaled": {"log_scale_ref": 64}, "dynamic-ntk": {"dynamic_ntk": True},
               "both": {"dynamic_ntk": True, "log_scale_ref": 64}}
MODEL_LEN = 512


def _model_loss_and_grads(cp: int, comm: str) -> dict:
    """Per RoPE case: the mean next-token loss of one 512-token sequence and every parameter's gradient,
    at this CP (the gradients summed over the CP group: each rank holds its tokens' share)."""
    from megarope import loss as loss_mod
    from megarope.model import build_model, get_preset

    parallel.init(cp=cp)
    preset = get_preset("toy", max_seq_len=MODEL_LEN, num_layers=2)
    tokens = torch.randint(0, preset.vocab_size, (1, MODEL_LEN), generator=torch.Generator().manual_seed(5))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "position_ids": torch.arange(MODEL_LEN)[None]}
    if cp > 1:
        batch = parallel.slice_for_cp(batch)
    out = {}
    for name, extra in MODEL_ROPES.items():
        parallel.seed_everything(1234)  # the same weights at every CP
        model = build_model(preset, RopeConfig(base=10000, train_len=128, **extra))
        A.set_cp_comm(model, comm)
        losses, _ = loss_mod.token_losses(model, batch["tokens"], batch["labels"], batch["position_ids"])
        loss = losses.sum() / MODEL_LEN
        loss.backward()
        total = torch.stack([loss.detach()])
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        if cp > 1:
            dist.all_reduce(total, group=parallel.cp_group())
            dist.all_reduce(grads, group=parallel.cp_group())
        out[name] = (float(total), grads)
    return out


def _at_cp_1_2_4():
    """On 4 ranks: the attention alone at CP=4 and CP=2 (x DP 2); the model at CP=4 and CP=2 with either
    way of passing K/V, and at CP=1 (x DP 4)."""
    return {"attention": {cp: _attention_at(cp) for cp in (4, 2)},
            "model": {(cp, comm): _model_loss_and_grads(cp, comm)
                      for cp, comm in ((4, "all-gather"), (4, "ring"), (2, "auto"), (2, "ring"), (1, "auto"))}}


@pytest.mark.slow  # 30-100 s: four processes on two cores
def test_cp_2_and_4_equal_one_process_forward_and_backward():
    expected = {}
    for t_ref in (None, 16):
        q, k, v = (x.clone().requires_grad_() for x in _inputs())
        out = reference(q, k, v, t_ref)
        out.square().sum().backward()
        expected[t_ref] = (out.detach(), (q.grad, k.grad, v.grad))
    results = run_distributed(_at_cp_1_2_4, 4)
    for rank_results in results:
        # the attention alone, in float64: CP = reference, and ring = all-gather
        for cp, (mine, cases) in rank_results["attention"].items():
            for (t_ref, comm), (out, grads) in cases.items():
                torch.testing.assert_close(out, expected[t_ref][0][mine], rtol=1e-12, atol=1e-12)
                for got, full in zip(grads, expected[t_ref][1]):
                    torch.testing.assert_close(got, full[mine], rtol=1e-12, atol=1e-12)
            for t_ref in (None, 16):
                torch.testing.assert_close(cases[t_ref, "ring"], cases[t_ref, "all-gather"], rtol=1e-12, atol=1e-12)
        # the whole model, in float32: loss and every gradient within 1e-5 of CP=1
        model = rank_results["model"]
        for layout, got in model.items():
            for name in MODEL_ROPES:
                (loss, grads), (ref_loss, ref_grads) = got[name], model[1, "auto"][name]
                assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (layout, name, loss, ref_loss)
                err = float((grads - ref_grads).abs().max() / ref_grads.abs().max())
                assert err <= 1e-5, (layout, name, err)
    one = results[0]["model"][1, "auto"]  # the RoPE cases really differ at 512 tokens (train_len 128)
    assert len({round(one[name][0], 6) for name in MODEL_ROPES}) == len(MODEL_ROPES)


# ----------------------------------------------------------------------------------------------- training
def _train(corpus: str, root: str, cp: int) -> float:
    from megarope import train

    cfg = {"model": {"preset": "toy", "backend": "local"},
           "rope": {"base": 10000, "train_len": 32, "dynamic_ntk": True, "log_scale_ref": 32},
           "parallel": {"cp": cp},
           "train": {"steps": 3, "seq_len": 128, "global_batch": 4, "micro_batch": 2, "lr": 2e-3,
                     "warmup_steps": 1, "seed": 1234},
           "data": {"path": corpus, "tokenizer": "bytes"},
           "checkpoint": {"dir": os.path.join(root, f"cp{cp}"), "every": 0, "keep": 1},
           "log": {"tensorboard": False}}
    return train.run(cfg, progress=False)["loss"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks on a CPU")
def test_training_at_cp_2_equals_cp_1(tmp_path):
    """Three steps of the toy model with dynamic NTK and log-scaled queries: the loss after them (which
    the first two steps' gradients shaped) is the same at CP=2 as in one process."""
    from megarope import data

    stdlib = sysconfig.get_paths()["stdlib"]
    with open(tmp_path / "docs.jsonl", "w") as f:
        for name in ("argparse.py", "inspect.py", "typing.py", "ast.py"):
            with open(os.path.join(stdlib, name), encoding="utf-8") as src:
                f.write(json.dumps({"text": src.read()}) + "\n")
    corpus = data.preprocess([str(tmp_path / "docs.jsonl")], "bytes", str(tmp_path / "train"))["prefix"]
    one = _train(corpus, str(tmp_path), 1)
    parallel.destroy()
    two = run_distributed(_train, 2, corpus, str(tmp_path), 2)
    assert two[0] == two[1]
    assert abs(two[0] - one) <= 1e-5 * one, (two[0], one)

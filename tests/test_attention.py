"""megarope's core attention against a direct implementation, in one process and under CP=2."""

import math
from types import SimpleNamespace

import pytest
import torch
from distributed import run_distributed

from megarope import attention as A
from megarope import parallel
from megarope.parallel import cp_local_positions
from megarope.rope import RopeConfig

S, B, H, HK, D = 64, 2, 4, 2, 8


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



def make_core(rope, cp):
    config = SimpleNamespace(attention_dropout=0.0, kv_channels=D, context_parallel_size=cp)
    core = torch.nn.Module.__new__(A.ContextParallelAttention)
    torch.nn.Module.__init__(core)
    core.rope, core.softmax_scale = rope, D ** -0.5
    core.cp_group = None
    if cp > 1:
        core.cp_group = parallel.cp_group()
    core.config = config
    return core


@pytest.mark.parametrize("t_ref", [None, 16])
def test_one_process_matches_reference(t_ref):
    q, k, v = _inputs()
    out = make_core(RopeConfig(log_scale_ref=t_ref), 1)(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v, t_ref))


def test_query_blocks_match_one_block():
    q, k, v = (x.permute(1, 2, 0, 3) for x in _inputs())
    positions = torch.arange(S)
    whole = A.causal_attention(q, k, v, positions, D ** -0.5, block=S)
    blocked = A.causal_attention(q, k, v, positions, D ** -0.5, block=5)
    torch.testing.assert_close(whole, blocked)


def cp_worker(t_ref):
    parallel.init(cp=2)
    rank = torch.distributed.get_rank()
    q, k, v = _inputs()
    mine = cp_local_positions(S, 2, rank)
    local = [x[mine].clone().requires_grad_() for x in (q, k, v)]
    out = make_core(RopeConfig(log_scale_ref=t_ref), 2)(*local)
    out.square().sum().backward()
    return mine, out.detach(), [x.grad for x in local]


@pytest.mark.slow
@pytest.mark.parametrize("t_ref", [None, 16])
def test_cp2_matches_reference(t_ref):
    q, k, v = (x.clone().requires_grad_() for x in _inputs())
    expected = reference(q, k, v, t_ref)
    expected.square().sum().backward()
    for mine, out, grads in run_distributed(cp_worker, 2, t_ref):
        torch.testing.assert_close(out, expected[mine].detach())
        for got, full in zip(grads, (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(got, full[mine])


def test_dropout_is_refused():
    config = SimpleNamespace(attention_dropout=0.1, kv_channels=D, context_parallel_size=1)
    with pytest.raises(ValueError, match="dropout"):
        A.ContextParallelAttention(config, 1, None, "self")

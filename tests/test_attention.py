"""megarope's core attention: the fused kernels and their log-sum-exp merge against plain softmax
attention; CP=2 and CP=4 (all-gather and ring) against one process, forward and backward, in the
attention alone and in the whole model (with log-scaled queries and dynamic NTK); training at CP=2
against CP=1; the arguments the CUDA kernels get, checked on CPU tensors; the one-line refusals."""

import json
import math
import os
import sysconfig
from types import SimpleNamespace

import numpy as np
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
    s, b = q.shape[:2]
    if t_ref is not None:
        t = torch.arange(1, s + 1, dtype=torch.float64)
        q = q * torch.clamp(torch.log(t) / math.log(t_ref), min=1).to(q.dtype)[:, None, None, None]
    k, v = (x.repeat_interleave(H // HK, dim=2) for x in (k, v))
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v).reshape(s, b, H * D)


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


# ----------------------------------------------------------------------------------------------- CUDA's arguments
# The CUDA backward kernel takes out's batch and head strides but puts row m at m * heads * head_dim
# (kernel_backward.h: Params::o_strideM()) and reads a row's elements one after another. The CPU kernel reads
# any layout right, so what kernel_args hands the CUDA kernel is checked here, on CPU tensors.
def _rows_as_the_kernel_assumes(x: torch.Tensor) -> bool:
    o = x.transpose(1, 2)  # [b, s, h, d], as the kernel indexes it
    return o.stride(1) == o.size(2) * o.size(3) and o.stride(3) == 1


def _as_the_kernel_reads(x: torch.Tensor) -> torch.Tensor:
    o = x.transpose(1, 2)
    return o.as_strided(o.shape, (o.stride(0), o.size(2) * o.size(3), o.stride(2), 1)).transpose(1, 2)


def _folded(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b, h, s, ...] -> [b, kv_heads, g*s, ...]: the g query heads of each K/V head, one after another."""
    g = x.shape[1] // kv_heads
    return torch.stack([torch.cat([x[:, j * g + i] for i in range(g)], dim=1) for j in range(kv_heads)], dim=1)


def test_kernel_args_fold_query_groups_into_the_rows_the_kernel_reads():
    """The case the H200 got wrong (8 query heads over 2 K/V heads, unmasked, [b, h, s, d] tensors): the fold
    alone gives rows head_dim apart, the kernel reads them 2 * head_dim apart."""
    g = torch.Generator().manual_seed(3)
    q, out, grad = (torch.randn(2, 8, 41, 16, generator=g) for _ in range(3))
    k, v = (torch.randn(2, 2, 41, 16, generator=g) for _ in range(2))
    lse = torch.randn(2, 8, 41, generator=g)
    assert not _rows_as_the_kernel_assumes(out.reshape(2, 2, 4 * 41, 16))  # the fold without packing
    args = A.kernel_args(q, k, v, False, grad, out, lse)
    assert (args.groups, args.repeats) == (4, 1) and args.k is k and args.v is v
    for got, given in ((args.q, q), (args.out, out), (args.grad_out, grad)):
        assert got.shape == (2, 2, 164, 16) and torch.equal(got, _folded(given, 2))
    for x in (args.out, args.grad_out):
        assert _rows_as_the_kernel_assumes(x) and torch.equal(_as_the_kernel_reads(x), x)
    assert args.lse.shape == (2, 2, 192) and args.lse.stride(-1) == 1  # 164 queries padded to 6 x 32
    assert torch.equal(args.lse[..., :164], _folded(lse.unsqueeze(-1), 2).squeeze(-1))
    assert torch.equal(args.unfold(args.out), out) and torch.equal(args.unfold(args.lse[..., :164]), lse)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [H, HK])
def test_kernel_args_of_the_views_parts_backward_passes(causal, kv_heads):
    """Micro batch 2: [b, h, s, d] views of rows of megarope's [s, b, h, d] buffers, K and V out of one
    [s, b, 2*hk, d] buffer, as _Parts.backward passes them; their row stride is b * h * d."""
    g = torch.Generator().manual_seed(4)
    q_buf, out_buf, grad_buf = (torch.randn(S, B, H, D, generator=g) for _ in range(3))
    kv_buf = torch.randn(S, B, 2 * kv_heads, D, generator=g)
    rows = slice(S // 2, S)  # the second chunk's queries, over its own keys or the first chunk's
    keys = rows if causal else slice(0, S // 2)
    q, out, grad = (x[rows].permute(1, 2, 0, 3) for x in (q_buf, out_buf, grad_buf))
    k, v = (kv_buf[keys, :, part].permute(1, 2, 0, 3) for part in (slice(0, kv_heads), slice(kv_heads, None)))
    lse = torch.randn(B, H, S, generator=g)[..., rows].contiguous()
    assert not _rows_as_the_kernel_assumes(out)
    args = A.kernel_args(q, k, v, causal, grad, out, lse)
    fold = not causal and kv_heads < H
    assert (args.groups, args.repeats) == ((H // kv_heads, 1) if fold else (1, H // kv_heads if causal else 1))
    for got, given in ((args.q, q), (args.out, out), (args.grad_out, grad)):
        assert torch.equal(got, _folded(given, kv_heads) if fold else given)
    for x in (args.out, args.grad_out):
        assert _rows_as_the_kernel_assumes(x) and torch.equal(_as_the_kernel_reads(x), x)
    for got, given in ((args.k, k), (args.v, v)):
        assert torch.equal(got, given.repeat_interleave(args.repeats, 1))
    n = args.q.shape[2]
    assert args.lse.shape[-1] % 32 == 0 and torch.equal(args.unfold(args.lse[..., :n]), lse)


def test_kernel_args_copy_only_what_the_kernel_would_misread():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g) for _ in range(3))
    out, grad = (torch.randn(2, 64, 4, 16, generator=g).transpose(1, 2) for _ in range(2))  # the kernel's own rows
    lse = torch.randn(2, 4, 64, generator=g)  # 64 queries: no padding
    args = A.kernel_args(q, k, v, True, grad, out, lse)
    assert args.q is q and args.k is k and args.v is v
    for got, given in ((args.out, out), (args.grad_out, grad), (args.lse, lse)):
        assert got.data_ptr() == given.data_ptr() and torch.equal(got, given)


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_args_pose_the_same_attention(causal):
    """The CPU kernel run on kernel_args' arguments (folded, repeated, packed, padded) and mapped back gives the
    gradients it gives on the part's own tensors: the preparation changes no value."""
    q, k, v = (x[S // 2:].permute(1, 2, 0, 3) for x in _inputs())  # float64, H = 4 query heads over HK = 2
    scale = D ** -0.5
    out, lse = A.attention_with_lse(q, k, v, causal, scale)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(6))
    expected = A.attention_with_lse_backward(grad, q, k, v, out, lse, causal, scale)
    args = A.kernel_args(q, k, v, causal, grad, out, lse)
    kernel_out, kernel_lse = A.attention_with_lse(args.q, args.k, args.v, causal, scale)
    torch.testing.assert_close(args.unfold(kernel_out), out)
    dq, dk, dv = A.attention_with_lse_backward(args.grad_out, args.q, args.k, args.v, args.out,
                                               args.lse[..., :args.q.shape[2]], causal, scale)
    for got, want in zip((args.unfold(dq), args.kv_grad(dk), args.kv_grad(dv)), expected):
        torch.testing.assert_close(got, want)


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


# ----------------------------------------------------------------------------------------------- documents
BOUNDS = ((0, 11, 30, 48), (0, 23, 24, 48))  # a document per row straddles CP chunks; one is one token long


def document_reference(q, k, v, bounds, t_ref=None):
    """Each document of each row on its own: plain softmax attention, log-scaled by its own positions."""
    out = torch.zeros(S, B, H * D, dtype=q.dtype)
    for b, row in enumerate(bounds):
        for start, end in zip(row, row[1:]):
            out[start:end, b] = reference(*(x[start:end, b:b + 1] for x in (q, k, v)), t_ref)[:, 0]
    return out


def _documents(bounds, mine=slice(None)):
    from megarope.packing import Documents

    positions = torch.tensor([[p - max(s for s in row if s <= p) for p in range(S)] for row in bounds])
    return Documents(qkv_format="sbhd", max_seqlen_q=S, max_seqlen_kv=S, bounds=bounds, separate=True,
                     positions=positions[:, mine], lengths=torch.zeros_like(positions[:, mine]))


@pytest.mark.parametrize("t_ref", [None, 16])
def test_documents_in_one_process_equal_each_document_alone_forward_and_backward(t_ref):
    leaves = [x.clone().requires_grad_() for x in _inputs()]
    out = make_core(RopeConfig(log_scale_ref=t_ref), 1)(*leaves, packed_seq_params=_documents(BOUNDS))
    expected_leaves = [x.clone().requires_grad_() for x in _inputs()]
    expected = document_reference(*expected_leaves, BOUNDS, t_ref)
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    expected.backward(grad)
    for got, want in zip(leaves, expected_leaves):
        torch.testing.assert_close(got.grad, want.grad)


def test_parts_split_at_document_bounds_and_skip_the_others():
    """A causal chunk over itself: each document's rows causally. Unmasked keys before the queries: each run of
    queries over the runs of keys of its own document, gathered keys cut where their positions jump."""
    bounds = [0, 10, 25, 40]
    assert A.document_parts(np.arange(8, 16), None, True, bounds) == [(slice(0, 2), slice(0, 2), True),
                                                                       (slice(2, 8), slice(2, 8), True)]
    queries, keys = np.arange(24, 32), np.arange(0, 16)  # chunk 3 over chunks 0-1: documents 0, 1 | 1, 2
    assert A.document_parts(queries, keys, False, bounds) == [(slice(0, 1), slice(10, 16), False)]
    keys = np.concatenate([np.arange(16, 20), np.arange(8, 12)])  # two chunks, gathered in rank order
    assert A.document_parts(queries, keys, False, bounds) == [(slice(0, 1), slice(0, 4), False),
                                                              (slice(0, 1), slice(6, 8), False)]
    assert A.document_parts(np.arange(32, 40), np.arange(0, 8), False, bounds) == []  # no document in common


def test_kernel_args_of_a_document_sub_part():
    """With documents the CP core hands the kernels one batch row's rows of a part: [1, h, n, d] views of
    [s, b, h, d] buffers, whose rows lie b * h * d apart; kernel_args lays them out as the CUDA kernel reads
    them, and the attention they pose is the part's."""
    g = torch.Generator().manual_seed(8)
    q_buf, out_buf, grad_buf = (torch.randn(S, B, H, D, dtype=torch.float64, generator=g) for _ in range(3))
    kv_buf = torch.randn(S, B, 2 * HK, D, dtype=torch.float64, generator=g)
    rows, keys, batch = slice(30, 41), slice(20, 29), slice(1, 2)
    for causal, key_rows in ((True, rows), (False, keys)):
        q, out, grad = (x[rows, batch].permute(1, 2, 0, 3) for x in (q_buf, out_buf, grad_buf))
        k, v = (kv_buf[key_rows, batch, part].permute(1, 2, 0, 3) for part in (slice(0, HK), slice(HK, None)))
        assert not _rows_as_the_kernel_assumes(out)
        lse = torch.randn(1, H, S, dtype=torch.float64, generator=g)[..., rows].contiguous()
        args = A.kernel_args(q, k, v, causal, grad, out, lse)
        for x in (args.out, args.grad_out):
            assert _rows_as_the_kernel_assumes(x) and torch.equal(_as_the_kernel_reads(x), x)
        expected = A.attention_with_lse_backward(grad, q, k, v, out, lse, causal, D ** -0.5)
        dq, dk, dv = A.attention_with_lse_backward(args.grad_out, args.q, args.k, args.v, args.out,
                                                   args.lse[..., :args.q.shape[2]], causal, D ** -0.5)
        for got, want in zip((args.unfold(dq), args.kv_grad(dk), args.kv_grad(dv)), expected):
            torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------- under CP
def _attention_at(cp):
    """Every (log-scaling, K/V passing, documents) case at this CP: this rank's positions, outputs and input
    gradients."""
    parallel.init(cp=cp)
    mine = cp_local_positions(S, cp, dist.get_rank(parallel.cp_group()))
    results = {}
    for t_ref in (None, 16):
        for comm in ("all-gather", "ring"):
            for documents in (None, _documents(BOUNDS, mine)):
                local = [x[mine].clone().requires_grad_() for x in _inputs()]
                out = make_core(RopeConfig(log_scale_ref=t_ref), cp, comm)(*local, packed_seq_params=documents)
                out.square().sum().backward()
                results[t_ref, comm, documents is not None] = (out.detach(), [x.grad for x in local])
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


DOC_LENGTHS = ([50, 37, 41], [41, 50, 37])  # two rows of three documents, 128 tokens each
PACKED_ROPE = {"base": 10000, "train_len": 32, "dynamic_ntk": True, "log_scale_ref": 16}


def _packed_documents():
    """The documents of DOC_LENGTHS: random bytes, each ending in EOD (256)."""
    g = torch.Generator().manual_seed(9)
    return [[torch.cat([torch.randint(0, 256, (n - 1,), generator=g), torch.tensor([256])]) for n in row]
            for row in DOC_LENGTHS]


def _packed_model():
    from megarope.model import build_model, get_preset

    parallel.seed_everything(1234)  # the same weights at every layout
    return build_model(get_preset("toy", max_seq_len=128, num_layers=2), RopeConfig(**PACKED_ROPE),
                       sequence_parallel=True)


def documents_alone() -> tuple[torch.Tensor, torch.Tensor]:
    """Each document of DOC_LENGTHS run on its own (one process): per-token losses [2, 128] in packed order,
    and the gradient of their sum."""
    from megarope import loss as loss_mod

    parallel.init()
    model = _packed_model()
    rows = []
    for documents in _packed_documents():
        row = torch.cat(documents)
        labels = torch.roll(row, -1)  # the packed sequence's labels: a document's EOD predicts the next one
        starts = np.cumsum([0] + [len(d) for d in documents])
        rows.append(torch.cat([loss_mod.token_losses(model, row[None, a:b], labels[None, a:b])[0]
                               for a, b in zip(starts, starts[1:])], dim=1))
    losses = torch.cat(rows)
    losses.sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    parallel.destroy()
    return losses.detach(), grads


def _packed_at(tp: int, cp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The documents packed into two rows of 128 (megarope.packing, local backend) at TP x CP: this rank's
    positions, per-token losses, and (TP 1) the gradient of the loss sum over all tokens."""
    from megarope import loss as loss_mod
    from megarope import packing

    parallel.init(tp=tp, cp=cp)
    model = _packed_model()
    tokens = torch.stack([torch.cat(row) for row in _packed_documents()])
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(tokens.shape),
             "position_ids": torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOC_LENGTHS])}
    rank = dist.get_rank(parallel.cp_group())
    local, documents = packing.Packing(True, True, 256, "local", cp, rank).pack(batch)
    losses, _ = loss_mod.token_losses(model, local["tokens"], local["labels"], local["position_ids"],
                                      packed_seq_params=documents)
    losses.sum().backward()
    grads = None
    if tp == 1:
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        dist.all_reduce(grads, group=parallel.cp_group())
    return cp_local_positions(128, cp, rank), losses.detach(), grads


def _at_cp_1_2_4():
    """On 4 ranks: the attention alone at CP=4 and CP=2 (x DP 2); the model at CP=4 and CP=2 with either
    way of passing K/V, and at CP=1 (x DP 4); packed documents in the model at TP x CP = 1 x 1, 1 x 2, 2 x 1
    and 2 x 2."""
    return {"attention": {cp: _attention_at(cp) for cp in (4, 2)},
            "packed": {(tp, cp): _packed_at(tp, cp) for tp, cp in ((1, 1), (1, 2), (2, 1), (2, 2))},
            "model": {(cp, comm): _model_loss_and_grads(cp, comm)
                      for cp, comm in ((4, "all-gather"), (4, "ring"), (2, "auto"), (2, "ring"), (1, "auto"))}}


@pytest.fixture(scope="module")
def four_ranks():
    """_at_cp_1_2_4's results on each of 4 ranks (one start of the processes for the tests that read them)."""
    return run_distributed(_at_cp_1_2_4, 4)


@pytest.mark.slow  # 30-100 s: four processes on two cores
def test_cp_2_and_4_equal_one_process_forward_and_backward(four_ranks):
    """The attention alone, with and without documents (each against its one-process reference), and the model."""
    expected = {}
    for t_ref in (None, 16):
        for documents in (False, True):
            q, k, v = (x.clone().requires_grad_() for x in _inputs())
            out = document_reference(q, k, v, BOUNDS, t_ref) if documents else reference(q, k, v, t_ref)
            out.square().sum().backward()
            expected[t_ref, documents] = (out.detach(), (q.grad, k.grad, v.grad))
    results = four_ranks
    for rank_results in results:
        # the attention alone, in float64: CP = reference, and ring = all-gather
        for cp, (mine, cases) in rank_results["attention"].items():
            for (t_ref, comm, documents), (out, grads) in cases.items():
                want_out, want_grads = expected[t_ref, documents]
                torch.testing.assert_close(out, want_out[mine], rtol=1e-12, atol=1e-12)
                for got, full in zip(grads, want_grads):
                    torch.testing.assert_close(got, full[mine], rtol=1e-12, atol=1e-12)
            for t_ref in (None, 16):
                for documents in (False, True):
                    torch.testing.assert_close(cases[t_ref, "ring", documents], cases[t_ref, "all-gather", documents],
                                               rtol=1e-12, atol=1e-12)
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


@pytest.mark.slow  # the processes of four_ranks
def test_packed_documents_give_each_token_the_loss_it_has_alone_at_cp_and_tp(four_ranks):
    """Three documents in each of two rows of 128 tokens (the local backend: megarope's attention skips the
    other documents' keys, RoPE and log-scaling take each token's own position, dynamic NTK each document's
    length): per token, the loss of each document run on its own, at CP 1 and 2 and TP 1 and 2 (sequence
    parallel); the gradient too (TP 1, summed over CP)."""
    alone, alone_grads = documents_alone()
    for rank_results in four_ranks:
        for (tp, cp), (mine, losses, grads) in rank_results["packed"].items():
            torch.testing.assert_close(losses, alone[:, mine], rtol=1e-5, atol=1e-5, msg=f"TP {tp} x CP {cp}")
            if grads is not None:
                err = float((grads - alone_grads).abs().max() / alone_grads.abs().max())
                assert err <= 1e-5, (tp, cp, err)


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

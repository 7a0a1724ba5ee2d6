"""Core attention plugged in by the layer spec: causal attention with context parallelism over any
torch.distributed backend (gloo included), and log-scaled queries with global positions.

megatron-core's local DotProductAttention refuses CP > 1 (only TE's attention does CP); this module
is what lets the "local" backend run CP on CPUs, and on GPUs without Transformer Engine.

The CP scheme
-------------
megatron splits each sequence into 2*CP chunks of c tokens and gives CP rank r the chunks r and
2*CP-1-r (parallel.cp_chunk_ids). For the queries of a chunk, every earlier key chunk is visible in
full and its own chunk is visible causally. So each rank computes a handful of *parts*: its own two
chunks causally, and whole earlier chunks with no mask at all. No [queries x keys] mask is ever
built, and the masked upper half of the score matrix is never computed. Each part is one call of a
fused attention kernel that also returns the log-sum-exp (LSE) of its scores; the parts of a query
are merged with their LSEs (out = sum_p out_p * exp(lse_p - lse), lse = logsumexp_p lse_p), which
is exactly softmax attention over the union of their keys. The backward pass calls the kernel's own
backward once per part, with the *merged* output and LSE: that gives each part's exact share of the
gradient (the flash-attention backward only needs the final row statistics), so memory stays at the
forward's O(S/CP).

How K/V travel (``cp_comm``, chosen per model; "auto" by default):
  "all-gather"  two all-gathers per layer: the first chunks of all ranks (chunks 0..CP-1, in
                natural order) and the second chunks (2*CP-1..CP). Each rank then needs at most 5
                kernel calls, but holds the whole K/V of the layer (S x 2 x kv_heads x head_dim).
                The backward gathers again (nothing S-wide is saved) and reduce-scatters dK/dV.
  "ring"        K/V pass around the CP ring (isend/irecv, overlapped with the current step's
                kernel call): no rank ever holds more than two ranks' K/V (its current and the
                incoming one). dK/dV travel with them in the backward and arrive home after one
                last hop. CP kernel calls per layer instead of <= 5.
  "auto"        all-gather up to RING_ABOVE_CP ranks, ring above (docs/benchmarks.md has the
                measurements behind the crossover). megatron's own ``cp_comm_type`` ("all_gather",
                "p2p") selects a mode too; :func:`set_cp_comm` overrides it on a built model, and
                the evaluator picks the ring when only the ring fits ``--max-memory``.

Packed documents (packing.Documents; megatron's reset_attention_mask)
---------------------------------------------------------------------
Each token attends only to its own document. CP keeps megatron's chunks of the whole sequence (every
shape fixed), so a document may straddle chunks and ranks; the parts stay as above, and each is split
per batch row into sub-parts of one document each (document_parts): a chunk over itself into each
document's causal diagonal block, earlier keys into the runs of keys of the queries' own document
(at most one document spans two chunks). Pairs of documents that differ are never computed: no mask,
no wasted kernel work. Sub-parts are ordinary parts (one kernel call each, merged by LSE, the backward
as above), so the CPU and CUDA paths, and kernel_args, are the same with documents as without. A
variable-length kernel would make fewer calls, but the CPU has none, and CUDA's (the cu_seqlens forms
of the flash and memory-efficient kernels) would be a second CUDA path, unchecked on a GPU; the calls
grow with the documents per chunk, which is few for documents of thousands of tokens. At CP=1 each
document is one SDPA call. Log-scaled queries take each token's own position (position_ids).

Why these kernels and not PyTorch's own context parallelism
-----------------------------------------------------------
torch.distributed.tensor.experimental.context_parallel (PyTorch 2.14) implements the same
load-balanced ring, but it is built for DTensor: it monkey-patches F.scaled_dot_product_attention
for the whole process and dispatches only the CUDA SDPA ops (flash, memory-efficient, cuDNN); the
CPU kernel is not among them, so it cannot run on gloo/CPU, and it expects [b, h, s, d] tensors
sharded on a DeviceMesh rather than megatron's [s, b, h, d] with a CP process group. We therefore
call the same fused kernels it uses, directly, and keep the (short) scheduling here:
  CPU:  aten._scaled_dot_product_flash_attention_for_cpu (+ _backward): fused, returns the LSE, and
        takes GQA (fewer K/V heads) natively.
  CUDA: aten._scaled_dot_product_efficient_attention (+ _backward): any dtype (fp32 included, which
        the flash kernel lacks). Its LSE is padded to a multiple of 32 queries, and it wants as many
        K/V heads as query heads: unmasked parts fold the query groups into the query sequence
        (exact, no K/V copy), causal parts repeat the K/V heads of their one chunk. Its backward
        assumes a row layout of ``out`` that it does not check: :func:`kernel_args` prepares every
        argument (fold, repeat, LSE padding, packed rows) for both directions.
These are private aten ops (what torch's own CP and torch.compile call); their signatures are read
from PyTorch 2.14. The CUDA path ran on one H200 (torch 2.11): the forward held, and the backward gave
wrong dq/dk in bf16 where ``out`` came in another row layout, which kernel_args now packs; that fix
has not yet run on a GPU (tests/gpu/test_attention_cuda.py checks it there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megarope.packing import Documents
from megarope.parallel import cp_chunk_ids, cp_local_positions
from megarope.rope import RopeConfig, log_scale_factors

CP_COMM = ("auto", "all-gather", "ring")
RING_ABOVE_CP = 8
_MEGATRON_CP_COMM = {None: "auto", "all_gather": "all-gather", "allgather": "all-gather", "p2p": "ring"}
_LSE_ALIGN = 32  # the CUDA memory-efficient kernel pads its LSE to a multiple of this many queries

aten = torch.ops.aten


def resolve_cp_comm(mode: str, cp_size: int) -> str:
    """"all-gather" or "ring" for ``mode`` at this CP size ("auto": all-gather up to RING_ABOVE_CP)."""
    if mode not in CP_COMM:
        raise ValueError(f"cp_comm must be one of {', '.join(CP_COMM)}, got {mode!r}")
    if mode == "auto":
        return "all-gather" if cp_size <= RING_ABOVE_CP else "ring"
    return mode


# ----------------------------------------------------------------------------------------------- kernels
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class KernelArgs(NamedTuple):
    """The memory-efficient kernel's arguments for one part, laid out as its CUDA kernel reads them."""

    q: torch.Tensor  # [b, h', sq', d]: h' = kv_heads and sq' = groups * sq when the query groups are folded
    k: torch.Tensor  # [b, h', sk, d]
    v: torch.Tensor
    groups: int  # query heads folded into each K/V head's sequence (1: no fold)
    repeats: int  # copies of each K/V head (1: none)
    grad_out: torch.Tensor | None = None  # the backward's: like q, in the kernel's rows
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None  # [b, h', sq' padded to a multiple of _LSE_ALIGN], fp32

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """A result per kernel query (out, lse, dq: [b, h', sq', ...]) as one per query ([b, h, sq, ...])."""
        if self.groups == 1:
            return x
        b, kv_heads, rows = x.shape[:3]
        return x.reshape(b, kv_heads * self.groups, rows // self.groups, *x.shape[3:])

    def kv_grad(self, x: torch.Tensor) -> torch.Tensor:
        """dk or dv of the kernel's K/V heads ([b, h', sk, d]) summed onto the part's K/V heads."""
        if self.repeats == 1:
            return x
        b, heads, sk, d = x.shape
        return x.reshape(b, heads // self.repeats, self.repeats, sk, d).sum(2)


def _kernel_rows(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """x [b, h, s, d] as [b, kv_heads, g*s, d] (g = h / kv_heads query heads of a K/V head in a row; g = 1:
    x's shape) whose query rows lie as the kernel assumes: in the [b, g*s, kv_heads, d] transpose, row m
    starts m * kv_heads * d elements in and its d elements are adjacent. A view of x when x already lies
    so (the kernel's own output does), else one copy."""
    b, h, s, d = x.shape
    g = h // kv_heads
    rows = x.unflatten(1, (kv_heads, g)).permute(0, 2, 3, 1, 4)  # [b, g, s, kv_heads, d]: a view
    row = kv_heads * d
    if not (rows.stride(4) == 1 and rows.stride(2) == row and (g == 1 or rows.stride(1) == s * row)):
        rows = rows.contiguous()
    return rows.reshape(b, g * s, kv_heads, d).transpose(1, 2)


def _padded_lse(lse: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [..., n padded to a multiple of _LSE_ALIGN], unit stride (as the forward returns it)."""
    n = lse.shape[-1]
    width = math.ceil(n / _LSE_ALIGN) * _LSE_ALIGN
    if width == n and lse.stride(-1) == 1:
        return lse
    padded = lse.new_zeros(*lse.shape[:-1], width)
    padded[..., :n] = lse
    return padded


def kernel_args(q, k, v, causal: bool, grad_out=None, out=None, lse=None) -> KernelArgs:
    """The arguments of aten's memory-efficient attention for one part: the forward's (q, k, v), and with
    grad_out, out and lse (the merged output and LSE of these queries) the backward's. Pure tensor work, on
    any device: the CPU tests check the layout it returns.

    - GQA: the kernel wants as many K/V heads as query heads. Unmasked parts fold each K/V head's group of
      query heads into its query sequence (exact, no K/V copy); causal parts repeat the K/V heads (a
      causal mask is per position, so folded queries would see the wrong keys).
    - The backward reads ``out`` at a row stride of its own: PyTorch's mem_eff_attention/kernel_backward.h
      takes ``out``'s batch and head strides but computes its row stride as heads x head_dim
      (``Params::o_strideM()``), and in half precision the kernel computes delta = rowsum(dO * O) from
      ``out`` itself (``kKernelComputesDelta``, ``computeDelta``); in fp32 aten computes it, with the real
      strides. A fold, or a [b, h, s, d] view of megarope's [s, b, h, d] buffers with b >= 2, has another
      row stride: read as is, delta comes from other queries' rows (or past the buffer's end), and dq and
      dk are wrong. So ``out`` goes in packed rows, and ``grad_out`` too (aten would copy it into that
      layout anyway: its row stride is read, but the kernel wants it contiguous).
    - The LSE is padded to a multiple of _LSE_ALIGN queries, as the kernel's forward returns it.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    groups, repeats = (heads // kv_heads, 1) if not causal else (1, heads // kv_heads)
    if groups > 1:
        q = _kernel_rows(q, kv_heads)
    if repeats > 1:
        k, v = (t.repeat_interleave(repeats, dim=1) for t in (k, v))
    if out is None:
        return KernelArgs(q, k, v, groups, repeats)
    kernel_heads = q.shape[1]
    grad_out, out = (_kernel_rows(t, kernel_heads) for t in (grad_out, out))
    lse = _padded_lse(lse.reshape(lse.shape[0], kernel_heads, -1))
    return KernelArgs(q, k, v, groups, repeats, grad_out, out, lse)


def attention_with_lse(q, k, v, causal: bool, scale: float):
    """Fused softmax attention of q [b, h, sq, d] over k, v [b, hk, sk, d] (h a multiple of hk).

    Returns (out [b, h, sq, d], lse [b, h, sq] in fp32, fp64 for fp64 inputs). ``causal`` needs sq == sk.
    """
    if q.device.type != "cuda":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    args = kernel_args(q, k, v, causal)
    out, lse = aten._scaled_dot_product_efficient_attention(args.q, args.k, args.v, None, True, 0.0, causal,
                                                            scale=scale)[:2]
    return args.unfold(out), args.unfold(lse[..., :args.q.shape[2]])


def attention_with_lse_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float):
    """Gradients (dq, dk, dv) of one part, given the *merged* output and LSE of its queries."""
    if q.device.type != "cuda":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, lse, 0.0, causal,
                                                                         scale=scale)
    args = kernel_args(q, k, v, causal, grad_out, out, lse)
    no_dropout = torch.empty((), dtype=torch.int64, device=q.device)  # the RNG state is read only with dropout
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        args.grad_out, args.q, args.k, args.v, None, args.out, args.lse, no_dropout, no_dropout, 0.0,
        [True, True, True, False], causal, scale=scale)
    return args.unfold(dq), args.kv_grad(dk), args.kv_grad(dv)


def merge_parts(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Fold one part into the running (out, lse) of the same queries, in place."""
    merged = torch.logaddexp(lse, part_lse)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1)).add_(part_out * torch.exp(part_lse - merged).unsqueeze(-1))
    lse.copy_(merged)


# ----------------------------------------------------------------------------------------------- parts
def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] -> the [b, h, s, d] view the kernels take."""
    return x.permute(1, 2, 0, 3)


def _split_kv(kv: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed [s, b, 2*hk, d] (K heads, then V heads) -> K, V as [b, hk, s, d] views."""
    return _bhsd(kv[:, :, :kv_heads]), _bhsd(kv[:, :, kv_heads:])


class _Parts:
    """The parts of one rank's attention: (query rows, packed K/V, causal) triples, and their sweep.

    Query rows are a slice of this rank's 2c local queries; K/V are [s, b, 2*hk, d] buffers.
    ``forward`` merges every part into (out, lse); ``backward`` adds each part's gradient into dq and
    into the dK/dV buffer that goes with its K/V.

    With documents (``bounds``: each batch row's document bounds, in global positions), each part is
    split per batch row into sub-parts of one document each (:func:`document_parts`): a sub-part is a
    kernel call like any part, merged by its LSE. The keys of other documents are never computed.
    """

    def __init__(self, q: torch.Tensor, kv_heads: int, scale: float, bounds=None, cp_size: int = 1,
                 cp_rank: int = 0):
        self.q, self.kv_heads, self.scale, self.bounds = q, kv_heads, scale, bounds  # q: [s, b, h, d]
        if bounds is not None:  # the global position of each local query row
            self.places = cp_local_positions(q.shape[0] * cp_size, cp_size, cp_rank).numpy()

    def _calls(self, rows: slice, causal: bool, key_places):
        """(query rows, batch rows, key rows of the part's K/V, causal) of each kernel call of one part."""
        if self.bounds is None:
            yield rows, slice(None), slice(None), causal
            return
        for b, bounds in enumerate(self.bounds):
            for q, k, sub_causal in document_parts(self.places[rows], key_places, causal, bounds):
                yield slice(rows.start + q.start, rows.start + q.stop), slice(b, b + 1), k, sub_causal

    def forward(self, rows: slice, kv: torch.Tensor, causal: bool, out: torch.Tensor, lse: torch.Tensor,
                first: bool = False, key_places=None) -> None:
        for q_rows, batch, keys, sub_causal in self._calls(rows, causal, key_places):
            k, v = _split_kv(kv[keys, batch], self.kv_heads)
            part_out, part_lse = attention_with_lse(_bhsd(self.q[q_rows, batch]), k, v, sub_causal, self.scale)
            if first:  # a query's own (causal) chunk comes first: its row is never empty
                _bhsd(out[q_rows, batch]).copy_(part_out)
                lse[batch, :, q_rows].copy_(part_lse)
            else:
                merge_parts(_bhsd(out[q_rows, batch]), lse[batch, :, q_rows], part_out, part_lse)

    def backward(self, rows: slice, kv: torch.Tensor, causal: bool, grad_out: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, dq: torch.Tensor, dkv: torch.Tensor, key_places=None) -> None:
        for q_rows, batch, keys, sub_causal in self._calls(rows, causal, key_places):
            k, v = _split_kv(kv[keys, batch], self.kv_heads)
            dq_part, dk, dv = attention_with_lse_backward(
                _bhsd(grad_out[q_rows, batch]), _bhsd(self.q[q_rows, batch]), k, v, _bhsd(out[q_rows, batch]),
                lse[batch, :, q_rows].contiguous(), sub_causal, self.scale)
            _bhsd(dq[q_rows, batch]).add_(dq_part)
            dk_buf, dv_buf = _split_kv(dkv[keys, batch], self.kv_heads)
            dk_buf.add_(dk)
            dv_buf.add_(dv)


def _runs(places: np.ndarray, bounds) -> list[tuple[slice, int]]:
    """(rows, document) of each run of ``places`` (global positions) that is consecutive and in one document."""
    document = np.searchsorted(np.asarray(bounds), places, side="right") - 1
    cut = np.flatnonzero((np.diff(places) != 1) | (np.diff(document) != 0)) + 1
    edges = [0, *cut.tolist(), len(places)]
    return [(slice(a, b), int(document[a])) for a, b in zip(edges, edges[1:])]


def document_parts(q_places: np.ndarray, k_places: np.ndarray | None, causal: bool, bounds):
    """A part split by documents: (query rows, key rows, causal) slices of the part's own rows, one document
    each. ``q_places``/``k_places``: the global positions of the part's query and key rows; ``bounds``: where
    each document of the row starts, and the row's length.

    A causal part is a chunk over itself: each document's rows of it, causally. In an unmasked part every key
    precedes every query: a run of queries sees each run of keys of its own document, unmasked. Runs break
    where a document does, and where the global positions jump (keys gathered from several chunks).
    Sub-parts rather than one variable-length kernel call: the CPU has no such kernel, and on CUDA every
    call goes through :func:`kernel_args`, whose layout is the one the GPU run checked.
    """
    if causal:
        return [(rows, rows, True) for rows, _ in _runs(q_places, bounds)]
    keys = {}
    for rows, document in _runs(k_places, bounds):
        keys.setdefault(document, []).append(rows)
    return [(rows, key_rows, False) for rows, document in _runs(q_places, bounds)
            for key_rows in keys.get(document, ())]


def _all_gather(local: torch.Tensor, group) -> torch.Tensor:
    out = local.new_empty(local.shape[0] * dist.get_world_size(group), *local.shape[1:])
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, local.contiguous(), group=group)
    return out


def _reduce_scatter(full: torch.Tensor, group) -> torch.Tensor:
    out = full.new_empty(full.shape[0] // dist.get_world_size(group), *full.shape[1:])
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, full.contiguous(), group=group)
    return out


def _all_gather_parts(kv: torch.Tensor, group):
    """(rows, K/V, causal, which dK/dV buffer) of every part, K/V gathered from the whole group.

    Rank r's queries are chunk r (rows :c) and chunk 2C-1-r (rows c:). ``firsts`` gathers chunks
    0..C-1 in natural order, ``seconds`` chunks 2C-1..C (rank order); unmasked keys may come in any order.
    """
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    c = kv.shape[0] // 2
    firsts, seconds = _all_gather(kv[:c], group), _all_gather(kv[c:], group)
    mine, other = slice(0, c), slice(c, 2 * c)
    parts = [(mine, kv[mine], True, "local", mine), (other, kv[other], True, "local", other)]
    if r > 0:  # chunks 0..r-1: before both of this rank's chunks
        parts.append((slice(0, 2 * c), firsts[:r * c], False, "firsts", slice(0, r * c)))
    parts.append((slice(c, 2 * c), firsts[r * c:], False, "firsts", slice(r * c, cp * c)))  # chunks r..C-1
    if r < cp - 1:  # chunks C..2C-2-r, the second chunks of ranks r+1..C-1
        parts.append((slice(c, 2 * c), seconds[(r + 1) * c:], False, "seconds", slice((r + 1) * c, cp * c)))
    return parts, {"firsts": firsts, "seconds": seconds}


def _gathered_places(cp: int, r: int, c: int) -> dict:
    """The global position of each row of the K/V buffers of _all_gather_parts."""
    seconds = [np.arange(chunk * c, (chunk + 1) * c) for rank in range(cp) for chunk in cp_chunk_ids(cp, rank)[1:]]
    return {"local": cp_local_positions(2 * c * cp, cp, r).numpy(), "firsts": np.arange(cp * c),
            "seconds": np.concatenate(seconds)}


def _ring_parts(step: int, cp: int, r: int, c: int):
    """(rows, key rows of the visiting K/V, causal) of the parts at ring step ``step``."""
    source = (r - step) % cp
    if step == 0:
        return [(slice(0, c), slice(0, c), True), (slice(c, 2 * c), slice(c, 2 * c), True),
                (slice(c, 2 * c), slice(0, c), False)]
    if source < r:  # its first chunk precedes both of ours; its second follows both
        return [(slice(0, 2 * c), slice(0, c), False)]
    return [(slice(c, 2 * c), slice(0, 2 * c), False)]  # both its chunks precede our second only


def _pass_along(tensors, group, tag: int):
    """Send each tensor to the next rank and receive the same shapes from the previous one."""
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for i, (t, into) in enumerate(zip(tensors, received)):
        ops.append(dist.P2POp(dist.isend, t, group=group, group_peer=(r + 1) % cp, tag=tag + i))
        ops.append(dist.P2POp(dist.irecv, into, group=group, group_peer=(r - 1) % cp, tag=tag + i))
    return dist.batch_isend_irecv(ops), received


class _ContextParallelCore(torch.autograd.Function):
    """Causal attention of this rank's 2c queries [s, b, h, d] over the whole CP group's keys."""

    @staticmethod
    def forward(ctx, query, key, value, group, scale: float, comm: str, bounds):
        kv = torch.cat([key, value], dim=2)  # [2c, b, 2*hk, d]: one buffer to send
        hk, c, acc = key.shape[2], query.shape[0] // 2, _accumulation_dtype(query.dtype)
        cp, r = dist.get_world_size(group), dist.get_rank(group)
        parts = _Parts(query, hk, scale, bounds, cp, r)
        out = torch.empty(query.shape, dtype=acc, device=query.device)
        lse = torch.empty(query.shape[1], query.shape[2], query.shape[0], dtype=acc, device=query.device)
        if comm == "all-gather":
            plan, _ = _all_gather_parts(kv, group)
            places = _gathered_places(cp, r, c) if bounds else None
            for k, (rows, keys, causal, buffer, key_rows) in enumerate(plan):
                parts.forward(rows, keys, causal, out, lse, first=k < 2,
                              key_places=places[buffer][key_rows] if places else None)
        else:
            for step in range(cp):
                next_kv = _pass_along([kv], group, tag=0) if step < cp - 1 else None  # overlaps the kernels
                places = cp_local_positions(2 * c * cp, cp, (r - step) % cp).numpy() if bounds else None
                for k, (rows, keys, causal) in enumerate(_ring_parts(step, cp, r, c)):
                    parts.forward(rows, kv[keys], causal, out, lse, first=step == 0 and k < 2,
                                  key_places=places[keys] if bounds else None)
                if next_kv:
                    for work in next_kv[0]:
                        work.wait()
                    (kv,) = next_kv[1]
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.group, ctx.scale, ctx.comm, ctx.bounds = group, scale, comm, bounds
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        group, comm, bounds = ctx.group, ctx.comm, ctx.bounds
        hk, c, acc = key.shape[2], query.shape[0] // 2, _accumulation_dtype(query.dtype)
        cp, r = dist.get_world_size(group), dist.get_rank(group)
        grad_out = grad_out.contiguous()
        parts = _Parts(query, hk, ctx.scale, bounds, cp, r)
        kv = torch.cat([key, value], dim=2)
        dq = torch.zeros(query.shape, dtype=acc, device=query.device)
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        if comm == "all-gather":
            plan, gathered = _all_gather_parts(kv, group)
            places = _gathered_places(cp, r, c) if bounds else None
            grads = {name: torch.zeros(t.shape, dtype=acc, device=t.device) for name, t in gathered.items()}
            grads["local"] = dkv
            for rows, keys, causal, buffer, key_rows in plan:
                parts.backward(rows, keys, causal, grad_out, out, lse, dq, grads[buffer][key_rows],
                               key_places=places[buffer][key_rows] if places else None)
            dkv[:c] += _reduce_scatter(grads["firsts"], group)
            dkv[c:] += _reduce_scatter(grads["seconds"], group)
        else:
            travelling = dkv  # the dK/dV of the K/V this rank holds now: they travel together
            for step in range(cp):
                next_kv = _pass_along([kv], group, tag=0) if step < cp - 1 else None
                places = cp_local_positions(2 * c * cp, cp, (r - step) % cp).numpy() if bounds else None
                for rows, keys, causal in _ring_parts(step, cp, r, c):
                    parts.backward(rows, kv[keys], causal, grad_out, out, lse, dq, travelling[keys],
                                   key_places=places[keys] if bounds else None)
                # after the last step this is one more hop: each dK/dV reaches the rank that owns those K/V
                works, (travelling,) = _pass_along([travelling], group, tag=1)
                for work in works + (next_kv[0] if next_kv else []):
                    work.wait()
                if next_kv:
                    (kv,) = next_kv[1]
            dkv = travelling
        dk, dv = dkv[:, :, :hk], dkv[:, :, hk:]
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None, None, None


def context_parallel_attention(query, key, value, group, scale: float, comm: str = "auto",
                               bounds=None) -> torch.Tensor:
    """Causal attention for this CP rank's tokens: query [2c, b, h, d], key/value [2c, b, hk, d] (after
    RoPE) in megatron's load-balanced layout; returns [2c, b, h, d]. Differentiable in all three.
    ``bounds``: per batch row, where each document starts (global positions) and the row's length;
    a token then attends only to the tokens of its own document."""
    if query.shape[0] % 2:
        raise ValueError(f"a CP rank holds two equal chunks, got {query.shape[0]} tokens")
    comm = resolve_cp_comm(comm, dist.get_world_size(group))
    return _ContextParallelCore.apply(query, key, value, group, scale, comm, bounds)


def document_attention(query, key, value, bounds, scale: float) -> torch.Tensor:
    """Causal attention inside each document, in one process: query [s, b, h, d], key/value [s, b, hk, d],
    ``bounds`` per batch row as context_parallel_attention takes them; returns [s, b, h, d]. One fused
    SDPA call per document: the pairs of documents that differ are never computed."""
    rows = []
    for b, row in enumerate(bounds):
        documents = [[_bhsd(t[start:end, b:b + 1]) for t in (query, key, value)] for start, end in zip(row, row[1:])]
        rows.append(torch.cat([F.scaled_dot_product_attention(*qkv, is_causal=True, scale=scale, enable_gqa=True)
                               for qkv in documents], dim=2))
    return torch.cat(rows).permute(2, 0, 1, 3)


# ----------------------------------------------------------------------------------------------- helpers
class _GatherAlongSeq(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[s_local, ...] on each CP rank -> [S, ...] in natural (global position) order."""
    cp_size = dist.get_world_size(group)
    chunks = _GatherAlongSeq.apply(x, group).chunk(2 * cp_size, dim=0)  # rank 0's two chunks, then rank 1's, ...
    owner = {}
    for rank in range(cp_size):
        for slot, chunk_id in enumerate(cp_chunk_ids(cp_size, rank)):
            owner[chunk_id] = 2 * rank + slot
    return torch.cat([chunks[owner[c]] for c in range(2 * cp_size)], dim=0)


def scale_queries(query: torch.Tensor, rope: RopeConfig | None, cp_group, positions=None) -> torch.Tensor:
    """Log-scaled attention: multiply the query at position t by max(1, ln t / ln T_ref). The position is the
    global one of this rank's query rows, or each query's own in ``positions`` (packed documents: [s, b] for
    queries [s, b, h, d], [t] for THD queries [t, h, d]; they restart at each document with
    reset_position_ids)."""
    if rope is None or rope.log_scale_ref is None:
        return query
    if positions is None:
        cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
        cp_rank = 0 if cp_group is None else dist.get_rank(cp_group)
        positions = (cp_local_positions(query.shape[0] * cp_size, cp_size, cp_rank, query.device) if cp_size > 1
                     else torch.arange(query.shape[0], device=query.device))
    factors = log_scale_factors(positions, rope.log_scale_ref).to(query.dtype)
    return query * factors.view(*positions.shape, *([1] * (query.dim() - positions.dim())))


# ----------------------------------------------------------------------------------------------- modules
class ContextParallelAttention(MegatronModule):
    """Causal self-attention core for megatron's SelfAttention, CP over any backend.

    Takes query [sq, b, h, d] and key/value [sq, b, hk, d] for this rank's tokens (after RoPE)
    and returns [sq, b, h*d], as megatron's DotProductAttention does.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, rope: RopeConfig | None = None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("megarope's core attention has no attention dropout (LLaMA uses none)")
        if cp_comm_type not in _MEGATRON_CP_COMM:
            raise ValueError(f"megarope's core attention passes K/V as all_gather or p2p, not {cp_comm_type!r}")
        self.rope = rope
        self.cp_comm = _MEGATRON_CP_COMM[cp_comm_type]
        self.softmax_scale = softmax_scale or config.kv_channels ** -0.5
        self.cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") else None
        if self.cp_group is None and config.context_parallel_size > 1:  # the global group when none was passed
            self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        documents = packed_seq_params if isinstance(packed_seq_params, Documents) else None
        if (packed_seq_params is not None and (documents is None or documents.qkv_format != "sbhd")
                or attention_bias is not None):
            raise ValueError("megarope's core attention takes packed documents as packing.Documents lays them out "
                             "for the local backend (not THD), and no attention bias")
        cp_group = self.cp_group if self.cp_group is not None and dist.get_world_size(self.cp_group) > 1 else None
        query = scale_queries(query, self.rope, cp_group, None if documents is None else documents.positions.t())
        bounds = documents.bounds if documents is not None and documents.separate else None
        if cp_group is None and bounds:
            out = document_attention(query, key, value, bounds, self.softmax_scale)
        elif cp_group is None:
            out = F.scaled_dot_product_attention(*(_bhsd(t) for t in (query, key, value)), is_causal=True,
                                                 scale=self.softmax_scale, enable_gqa=True)
            out = out.permute(2, 0, 1, 3)
        else:
            out = context_parallel_attention(query, key, value, cp_group, self.softmax_scale, self.cp_comm, bounds)
        s, b, h, d = out.shape
        return out.reshape(s, b, h * d)


def set_cp_comm(model: torch.nn.Module, mode: str) -> None:
    """How every ContextParallelAttention of ``model`` passes K/V: "auto", "all-gather" or "ring"."""
    resolve_cp_comm(mode, 1)  # validates
    for module in model.modules():
        if isinstance(module, ContextParallelAttention):
            module.cp_comm = mode


def log_scaled_te_attention(te_attention_cls):
    """A subclass of TE's DotProductAttention that log-scales queries first (TE does the CP)."""

    class LogScaledTEDotProductAttention(te_attention_cls):
        def __init__(self, *args, rope: RopeConfig | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.rope = rope

        def forward(self, query, key, value, *args, **kwargs):
            group = parallel_state.get_context_parallel_group(check_initialized=False)
            group = group if group is not None and dist.get_world_size(group) > 1 else None
            packed = kwargs.get("packed_seq_params")  # THD documents (packing): each token's own position
            positions = packed.positions if isinstance(packed, Documents) and packed.qkv_format == "thd" else None
            return super().forward(scale_queries(query, self.rope, group, positions), key, value, *args, **kwargs)

    return LogScaledTEDotProductAttention

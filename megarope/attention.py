"""Core attention plugged in by the layer spec: causal attention with context parallelism over
any torch.distributed backend (gloo included), and log-scaled queries with global positions.

megatron-core's local DotProductAttention refuses CP > 1 (only TE's attention does CP); this
module is what lets the "local" backend run CP on CPUs and on GPUs without Transformer Engine.

CP scheme: all-gather of K/V over the CP group. Each rank holds the 2 of the 2*CP chunks that
megatron's load-balanced order gives it (r and 2*CP-1-r); after the gather, K/V are put back in
natural order and each local query block attends to the keys at or before its global position.
Memory per rank is O(S) for K/V plus O(query_block * S) for one block of scores.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megarope.parallel import cp_chunk_ids, cp_local_positions
from megarope.rope import RopeConfig, log_scale_factors

QUERY_BLOCK = 1024


class _GatherAlongSeq(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient and keeps this rank's slice.

    (torch.distributed.nn's all_gather backward needs reduce_scatter, which gloo lacks.)
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), dim=0)[dist.get_rank(ctx.group)], None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[s_local, ...] on each CP rank -> [S, ...] in natural (global position) order."""
    cp_size = dist.get_world_size(group)
    gathered = _GatherAlongSeq.apply(x, group)
    chunks = gathered.chunk(2 * cp_size, dim=0)  # rank 0's two chunks, then rank 1's, ...
    owner = {}
    for rank in range(cp_size):
        for slot, chunk_id in enumerate(cp_chunk_ids(cp_size, rank)):
            owner[chunk_id] = 2 * rank + slot
    return torch.cat([chunks[owner[c]] for c in range(2 * cp_size)], dim=0)


def scale_queries(query: torch.Tensor, rope: RopeConfig | None, cp_group) -> torch.Tensor:
    """Log-scaled attention: multiply the query at global position t by max(1, ln t / ln T_ref)."""
    if rope is None or rope.log_scale_ref is None:
        return query
    cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
    cp_rank = 0 if cp_group is None else dist.get_rank(cp_group)
    positions = cp_local_positions(query.shape[0] * cp_size, cp_size, cp_rank, query.device)
    factors = log_scale_factors(positions, rope.log_scale_ref).to(query.dtype)
    return query * factors.view(-1, *([1] * (query.dim() - 1)))


def causal_attention(q, k, v, q_positions, scale: float, block: int = QUERY_BLOCK):
    """q [b, h, sq, d] at global positions q_positions [sq]; k, v [b, hk, S, d] in natural order.

    Query blocks attend to the key prefix up to their last position, masked causally.
    """
    out = []
    key_pos = torch.arange(k.shape[2], device=q.device)
    for start in range(0, q.shape[2], block):
        pos = q_positions[start:start + block]
        end = int(pos.max()) + 1
        mask = key_pos[None, :end] <= pos[:, None]
        out.append(F.scaled_dot_product_attention(q[:, :, start:start + block], k[:, :, :end], v[:, :, :end],
                                                  attn_mask=mask, scale=scale, enable_gqa=True))
    return torch.cat(out, dim=2)


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
        self.rope = rope
        self.softmax_scale = softmax_scale or config.kv_channels ** -0.5
        self.cp_group = pg_collection.cp if pg_collection is not None and hasattr(pg_collection, "cp") else None
        if self.cp_group is None and config.context_parallel_size > 1:
            from megatron.core import parallel_state
            self.cp_group = parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias are not supported by megarope's core attention")
        cp_group = self.cp_group if self.cp_group is not None and dist.get_world_size(self.cp_group) > 1 else None
        query = scale_queries(query, self.rope, cp_group)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if cp_group is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=True)
        else:
            cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
            k, v = (gather_sequence(t.permute(2, 0, 1, 3), cp_group).permute(1, 2, 0, 3) for t in (k, v))
            positions = cp_local_positions(k.shape[2], cp_size, cp_rank, q.device)
            out = causal_attention(q, k, v, positions, self.softmax_scale)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def log_scaled_te_attention(te_attention_cls):
    """A subclass of TE's DotProductAttention that log-scales queries first (TE does the CP)."""

    class LogScaledTEDotProductAttention(te_attention_cls):
        def __init__(self, *args, rope: RopeConfig | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.rope = rope

        def forward(self, query, key, value, *args, **kwargs):
            from megatron.core import parallel_state
            group = parallel_state.get_context_parallel_group(check_initialized=False)
            group = group if group is not None and dist.get_world_size(group) > 1 else None
            return super().forward(scale_queries(query, self.rope, group), key, value, *args, **kwargs)

    return LogScaledTEDotProductAttention

"""The shared scoring core: per-position next-token loss and correctness of token sequences, under
TP x CP, in bounded memory. Perplexity and passkey retrieval are both built on score_sequences.

What is scored: a sequence of L tokens gives L-1 predictions -- column i is the prediction of token
i+1 from tokens 0..i (what ``transformers`` computes with ``labels=input_ids``).

Scale. score_sequences runs under torch.inference_mode. The sequence is split across the CP group
(parallel.slice_for_cp with global position ids: rank r keeps chunks r and 2*CP-1-r), each rank
scores its own tokens, and the per-token results are all-gathered back into global order. The loss
comes from loss.token_losses, which never builds the [sequence x vocab] logits (4096-token chunks).
With CP=1 the local backend's core attention is SDPA with is_causal (flash kernels: O(S) memory);
under CP it is attention.context_parallel_attention: fused kernels over whole chunks, no mask. Under
no_grad the decoder runs layer by layer and each layer's activations are freed before the next
starts, so the peak is one layer's working set on top of the residual stream. The MLP is the widest
part of a layer (fc1 out 2*ffn, silu, the linear half, the product: about 5*ffn values per token),
and it is per-token, so score_sequences runs each MLP over sequence chunks of ``mlp_chunk`` tokens
(exact: nothing mixes tokens there). eval.memory.estimate_eval_memory counts all of this.

Sliding window (score_windowed): no token is predicted from more than W tokens of context. Windows
of W tokens start every ``stride`` tokens (W/2 by default; the last window is aligned to end at the
sequence's last token); each window is a fresh sequence with positions 0..W-1, and scores only the
targets that no earlier window scored (the first window scores all of its W-1). Every target after
the first window thus sees between W-stride and W-1 tokens of context, never more, and the model
never sees a position beyond W-1 -- the usual baseline for "no extrapolation at all".
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP

from megarope import parallel
from megarope.attention import gather_sequence
from megarope.errors import UsageError
from megarope.loss import DEFAULT_CHUNK, token_losses

MLP_CHUNK = 32768         # tokens per MLP call in score_sequences (exact; bounds the widest activation)
BATCH_TOKENS = 16384      # short sequences are batched up to this many tokens per forward pass


def model_parallel_sizes() -> tuple[int, int]:
    """(TP, CP) of the current parallel state; (1, 1) before any."""
    if not parallel_state.model_parallel_is_initialized():
        return 1, 1
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_context_parallel_world_size()


def check_lengths(lengths: Sequence[int], tp: int, cp: int, what: str = "length") -> list[int]:
    """The distinct lengths, sorted; each must split into 2*CP chunks of a multiple of TP tokens."""
    lengths = sorted(set(int(x) for x in lengths))
    if not lengths:
        raise UsageError("no lengths given")
    unit = 2 * cp * tp
    for length in lengths:
        if length < 2:
            raise UsageError(f"{what} {length} is too short (at least 2 tokens)")
        if length % unit:
            raise UsageError(f"{what} {length} is not divisible by 2*CP*TP = {unit}")
    return lengths


@contextlib.contextmanager
def chunked_mlp(model, chunk: int | None):
    """Run every MLP of ``model`` over sequence chunks of ``chunk`` tokens (exact: the MLP is per token)."""
    patched = []
    if chunk:
        for module in model.modules():
            if isinstance(module, MLP) and "forward" not in module.__dict__:
                original = module.forward

                def forward(hidden_states, *args, _original=original, **kwargs):
                    # TransformerLayer passes padding_mask=None; anything per-token (a padding mask, MoE's
                    # per_token_scale) would need chunking too, so then run unchunked
                    if args or any(v is not None for v in kwargs.values()) or hidden_states.shape[0] <= chunk:
                        return _original(hidden_states, *args, **kwargs)
                    outs = [_original(hidden_states[i:i + chunk], **kwargs)
                            for i in range(0, hidden_states.shape[0], chunk)]
                    return torch.cat([o for o, _ in outs]), outs[0][1]  # the bias (None for LLaMA) is not per token

                module.forward = forward
                patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward


def score_sequences(model, token_ids: torch.Tensor, chunk: int = DEFAULT_CHUNK, batch_tokens: int = BATCH_TOKENS,
                    mlp_chunk: int | None = MLP_CHUNK):
    """Per-position next-token loss and correctness of ``token_ids`` [n, L] (the same on every rank of
    a model-parallel group), in global order on every rank.

    Returns (loss [n, L-1] float32, correct [n, L-1] bool) on the CPU: column i is the prediction of
    token i+1 from tokens 0..i. Under CP each rank scores its two chunks of the sequence and the
    results are all-gathered over the CP group and put back in natural order.
    """
    if token_ids.dim() != 2 or token_ids.shape[1] < 2:
        raise ValueError(f"token_ids must be [n, L] with L >= 2, got {tuple(token_ids.shape)}")
    n, length = token_ids.shape
    tp, cp = model_parallel_sizes()
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2*CP = {2 * cp}")
    group = parallel_state.get_context_parallel_group() if cp > 1 else None
    device = parallel.device()
    per_batch = max(1, batch_tokens // length)
    losses, correct = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), chunked_mlp(model, mlp_chunk):
            positions = torch.arange(length, device=device)
            for start in range(0, n, per_batch):
                tokens = token_ids[start:start + per_batch].to(device=device, dtype=torch.long)
                rows = tokens.shape[0]
                labels = torch.roll(tokens, -1, dims=1)  # the last label wraps around: scored, then dropped
                batch = {"tokens": tokens, "labels": labels, "position_ids": positions.expand(rows, -1)}
                if cp > 1:
                    batch = parallel.slice_for_cp(batch)
                lo, ok = token_losses(model, batch["tokens"], batch["labels"], batch["position_ids"], chunk)
                lo, ok = lo.float(), ok.float()
                if cp > 1:  # [rows, s_local] -> [S, rows] in natural order -> [rows, S]
                    lo = gather_sequence(lo.t().contiguous(), group).t()
                    ok = gather_sequence(ok.t().contiguous(), group).t()
                losses.append(lo[:, :-1].cpu())
                correct.append(ok[:, :-1].cpu() > 0.5)
    finally:
        model.train(was_training)
    return torch.cat(losses), torch.cat(correct)


def window_plan(length: int, window: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Sliding windows over a ``length``-token sequence: (start, first target scored) per window.

    Window k reads tokens [start, start+window) and scores targets first..start+window-1.
    """
    stride = window // 2 if stride is None else stride
    if window < 2 or not 0 < stride < window:  # windows must overlap: a window cannot predict its own first token
        raise ValueError(f"need window >= 2 and 0 < stride < window, got window {window}, stride {stride}")
    if window >= length:
        return [(0, 1)]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    plan, next_target = [], 1
    for start in starts:
        plan.append((start, next_target))
        next_target = start + window
    return plan


def score_windowed(model, ids: torch.Tensor, window: int, stride: int | None = None, **kwargs):
    """Sliding-window scores of one sequence ``ids`` [L]: (loss [L-1], correct [L-1]), like score_sequences."""
    length = ids.shape[0]
    plan = window_plan(length, window, stride)
    if len(plan) == 1:
        lo, ok = score_sequences(model, ids[None, :length], **kwargs)
        return lo[0], ok[0]
    lo, ok = score_sequences(model, torch.stack([ids[s:s + window] for s, _ in plan]), **kwargs)
    loss_out, correct_out = torch.empty(length - 1), torch.empty(length - 1, dtype=torch.bool)
    for k, (start, first) in enumerate(plan):
        # column j of window k predicts target start+j+1; keep targets first..start+window-1
        loss_out[first - 1:start + window - 1] = lo[k, first - start - 1:]
        correct_out[first - 1:start + window - 1] = ok[k, first - start - 1:]
    return loss_out, correct_out

"""Next-token loss straight from the hidden states, in sequence chunks.

The [sequence x vocab] logits tensor is never built: each chunk's logits live only while that
chunk's loss is computed (and are recomputed in the backward pass), so memory grows linearly
with length. Works with TP (vocab-parallel logits), sequence parallelism and CP (each rank scores
its own tokens). Plugged into GPTModel through its ``output_processor`` hook.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 4096


def _chunk_loss(hidden, weight, labels, vocab_start: int, padding_from: int | None, with_accuracy: bool):
    """hidden [c, b, h], weight [V/tp, h], labels [c, b] -> (loss [c, b] fp32, correct [c, b] or None).

    The logits matmul runs in the weights' dtype (bf16 on GPUs: tensor cores, which accumulate in
    fp32 inside the GEMM, as megatron's own output layer does); softmax and loss run in fp32.
    Nothing here reads a tensor's value on the host, so a GPU never waits for the CPU per chunk.
    """
    logits = torch.matmul(hidden.to(weight.dtype), weight.t()).float()
    if padding_from is not None:  # vocab padding rows are not tokens: keep them out of the softmax
        logits[..., padding_from:] = float("-inf")
    if not with_accuracy:  # megatron's cross entropy works in place on its input: nothing else needs it
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels), None
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits.clone(), labels)
    with torch.no_grad():
        best = logits.max(dim=-1).values
        local = labels - vocab_start
        in_shard = (local >= 0) & (local < logits.shape[-1])
        label_logit = torch.where(in_shard, logits.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1),
                                  torch.zeros_like(best))
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            group = parallel_state.get_tensor_model_parallel_group()
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(label_logit, group=group)
        correct = label_logit >= best
    return loss, correct


def _processor(*, hidden_states, output_layer, output_weight, labels, true_vocab, chunk, with_accuracy, **_):
    weight = output_weight if output_weight is not None else output_layer.weight
    if getattr(output_layer, "sequence_parallel", False):
        hidden = gather_from_sequence_parallel_region(hidden_states)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden_states)
    labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
    # This rank's vocab shard and where the padding rows begin in it: known on the host, once.
    local_vocab = weight.shape[0]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    padding_from = max(true_vocab - vocab_start, 0) if vocab_start + local_vocab > true_vocab else None
    losses, correct = [], []
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start:start + chunk], weight, labels[start:start + chunk].contiguous(), vocab_start,
                padding_from, with_accuracy)
        if torch.is_grad_enabled():
            loss, ok = checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            loss, ok = _chunk_loss(*args)
        losses.append(loss)
        correct.append(ok)
    losses = torch.cat(losses).transpose(0, 1)
    return losses, torch.cat(correct).transpose(0, 1) if with_accuracy else None


def token_losses(model, tokens, labels, position_ids=None, chunk: int = DEFAULT_CHUNK, with_accuracy: bool = True,
                 packed_seq_params=None):
    """Per-token loss (fp32) and next-token correctness, both [b, s] for this rank's tokens.

    ``tokens``/``labels``/``position_ids`` are this CP rank's slices ([b, s_local]).
    ``with_accuracy=False`` (training) skips the correctness work and returns (losses, None).
    ``packed_seq_params``: the micro batch's documents (packing.Packing.pack), or None.
    """
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    processor = functools.partial(_processor, true_vocab=model.megarope_preset.vocab_size, chunk=chunk,
                                  with_accuracy=with_accuracy)
    return model(tokens, position_ids, None, labels=labels, output_processor=processor,
                 packed_seq_params=packed_seq_params)


def mean_loss(losses: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the mean loss over the whole (CP-split) sequence, and the token count.

    megatron's DDP averages gradients over DP x CP, so each CP rank's partial sum is scaled by
    CP / (tokens in the full sequence): the averaged gradient is then that of the global mean.
    """
    mask = loss_mask.float()
    count = mask.sum()
    cp_size = parallel_state.get_context_parallel_world_size()
    total = count.detach().clone()
    if cp_size > 1:
        dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
    return (losses.float() * mask).sum() * cp_size / total.clamp(min=1), total

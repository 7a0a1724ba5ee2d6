"""Next-token loss straight from the hidden states: per-token fp32 losses [b, s], three ways.

full      training where the logits fit (train.loss, decided by memory.choose_loss): megatron's output
          layer once over the sequence ([s, b, V/TP] logits in the model's dtype; its sequence-parallel
          gather and TP gradient all-reduce), then a fused cross entropy -- one output GEMM forward and
          two backward, as megatron's own GPTModel runs them, nothing recomputed.
chunked   training where the logits would not fit: one chunk's logits at a time, recomputed in the
          backward pass (torch.utils.checkpoint): memory linear in length, at the price of one more
          output GEMM and loss pass per chunk.
scoring   no autograd (evaluation): chunk by chunk into one logits buffer made once, then torch's fused
          log-softmax in place in fp32 and correctness from the logits' max -- no buffer allocated per
          chunk, nothing kept.

The fused cross entropy of the full path: Transformer Engine's parallel_cross_entropy (through megatron's
te_parallel_cross_entropy) on GPUs, megatron's vocab_parallel_cross_entropy where TE is absent (CPUs).
TE's is two Triton kernels (an online-softmax pass, then one that writes the loss and the fp32 gradient)
reading the bf16 logits where they are; megatron's "native" fused one (fusions/fused_cross_entropy.py)
first copies them to fp32, takes four more passes, and hard-codes a bf16 gradient (wrong for fp32
training); its unfused one is the same passes unfused. TE's is called with is_cg_capturable=True: its
backward otherwise compares the incoming gradient with 1.0 on the host (a GPU sync every step).

Vocabulary padding rows (megarope.model pads the vocabulary to a multiple of 128) are not tokens: their
logits are set to -inf before the softmax. In the full path that is written outside autograd, which is
exact: the cross entropy's gradient at a -inf logit is 0 either way, and no backward pass over the
logits is added. All of it works with TP (vocab-parallel logits), sequence parallelism and CP (each
rank scores its own tokens), plugged into GPTModel through its ``output_processor`` hook, and nothing
here reads a tensor's value on the host.
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


@functools.cache
def _te_cross_entropy():
    """megatron's wrapper of Transformer Engine's parallel_cross_entropy, or None without TE."""
    try:
        from megatron.core.extensions.transformer_engine import te_parallel_cross_entropy
    except Exception:  # noqa: BLE001 - no TE (CPUs), or a TE that does not import: megatron's loss instead
        return None
    return te_parallel_cross_entropy


def cross_entropy_name(device: torch.device) -> str:
    """Which fused cross entropy the full path runs on ``device`` (for the train banner)."""
    if device.type == "cuda" and _te_cross_entropy() is not None:
        return "Transformer Engine's parallel_cross_entropy"
    return "megatron's vocab_parallel_cross_entropy"


def _tp() -> tuple[int, object]:
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_group()


def _label_logits(logits, labels, vocab_start: int):
    """Each token's label logit (0 where the label is in another TP rank's vocab shard), fp32."""
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1).float()
    return torch.where(in_shard, picked, torch.zeros_like(picked))


@torch.no_grad()
def _correct(logits, labels, vocab_start: int):
    """Whether each token's label has the highest logit (over all TP shards); ties count as correct."""
    best = logits.amax(dim=-1).float()
    label_logit = _label_logits(logits, labels, vocab_start)
    tp, group = _tp()
    if tp > 1:
        dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(label_logit, group=group)
    return label_logit >= best


def _full(hidden_states, output_layer, output_weight, labels, vocab_start, padding_from, with_accuracy):
    logits, _ = output_layer(hidden_states, weight=output_weight)  # [s, b, V/TP]
    if padding_from is not None:
        logits.detach()[..., padding_from:] = float("-inf")  # outside autograd: see the module docstring
    correct = _correct(logits, labels, vocab_start) if with_accuracy else None  # before megatron's in-place loss
    fused = _te_cross_entropy() if logits.is_cuda else None
    if fused is not None:
        loss = fused(logits, labels, _tp()[1], is_cg_capturable=True)
    else:
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    return loss, correct


def _chunk_loss(hidden, weight, labels, vocab_start: int, padding_from: int | None, with_accuracy: bool):
    """hidden [c, b, h], weight [V/tp, h], labels [c, b] -> (loss [c, b] fp32, correct [c, b] or None).

    The logits matmul runs in the weights' dtype (bf16 on GPUs: tensor cores, which accumulate in
    fp32 inside the GEMM, as megatron's own output layer does); softmax and loss run in fp32.
    """
    logits = torch.matmul(hidden.to(weight.dtype), weight.t()).float()
    if padding_from is not None:
        logits[..., padding_from:] = float("-inf")
    correct = _correct(logits, labels, vocab_start) if with_accuracy else None
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels), correct  # in place on logits


def _chunked(hidden, weight, labels, vocab_start, padding_from, chunk, with_accuracy):
    losses, correct = [], []
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start:start + chunk], weight, labels[start:start + chunk].contiguous(), vocab_start,
                padding_from, with_accuracy)
        loss, ok = checkpoint(_chunk_loss, *args, use_reentrant=False)
        losses.append(loss)
        correct.append(ok)
    return torch.cat(losses), torch.cat(correct) if with_accuracy else None


def _log_softmax_fp32(x, work):
    """log_softmax over the vocabulary in fp32, in ``work``: torch's fused kernel (a pass for the max, one for the
    sum, one to write) run in place, which its CPU and CUDA kernels allow (each reads a row whole before it
    writes any of it). fp32 logits are their own ``work``; others are copied there first (torch's CUDA kernel
    converts only float16 to fp32 by itself, its CPU kernel nothing)."""
    if work.data_ptr() != x.data_ptr():
        work.copy_(x)
    return torch.ops.aten._log_softmax.out(work, -1, False, out=work)


def _scoring(hidden, weight, labels, vocab_start, padding_from, chunk, with_accuracy):
    """Without autograd, chunk by chunk through buffers made once: the logits, then their fp32 log-softmax (in
    place for fp32 logits). Under TP the log-sum-exp is put together over the ranks instead:
    log(sum exp(x - max)) + max - x_label, with the max, the sum and the label's logit all-reduced."""
    s, b, h = hidden.shape
    rows, width = min(s, chunk) * b, weight.shape[0]
    logits = torch.empty(rows, width, dtype=weight.dtype, device=hidden.device)  # the GEMM writes here
    work = logits if weight.dtype == torch.float32 else torch.empty(rows, width, device=hidden.device)  # fp32
    flat_hidden, flat_labels = hidden.reshape(s * b, h), labels.reshape(s * b)
    losses = torch.empty(s * b, device=hidden.device)
    correct = torch.empty(s * b, dtype=torch.bool, device=hidden.device) if with_accuracy else None
    tp, group = _tp()
    for start in range(0, s * b, rows):
        n = min(rows, s * b - start)
        x = torch.mm(flat_hidden[start:start + n].to(weight.dtype), weight.t(), out=logits[:n])
        if padding_from is not None:
            x[:, padding_from:] = float("-inf")
        label_logit = _label_logits(x, flat_labels[start:start + n], vocab_start)
        best = x.amax(dim=-1).float() if with_accuracy or tp > 1 else None  # before x is overwritten
        if tp == 1:
            log_probs = _log_softmax_fp32(x, work[:n])
            losses[start:start + n] = -log_probs.gather(-1, flat_labels[start:start + n].unsqueeze(-1)).squeeze(-1)
        else:
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(label_logit, group=group)
            sum_exp = torch.sub(x, best.unsqueeze(-1), out=work[:n]).exp_().sum(dim=-1)
            dist.all_reduce(sum_exp, group=group)
            losses[start:start + n] = sum_exp.log_() + best - label_logit
        if with_accuracy:
            correct[start:start + n] = label_logit >= best
    return losses.view(s, b), correct.view(s, b) if with_accuracy else None


def _processor(*, hidden_states, output_layer, output_weight, labels, true_vocab, chunk, with_accuracy, full_logits,
               **_):
    weight = output_weight if output_weight is not None else output_layer.weight
    labels = labels.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
    # This rank's vocab shard and where the padding rows begin in it: known on the host, once.
    local_vocab = weight.shape[0]
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    padding_from = max(true_vocab - vocab_start, 0) if vocab_start + local_vocab > true_vocab else None
    if full_logits:
        losses, correct = _full(hidden_states, output_layer, output_weight, labels, vocab_start, padding_from,
                                with_accuracy)
    else:
        if getattr(output_layer, "sequence_parallel", False):
            hidden = gather_from_sequence_parallel_region(hidden_states)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden_states)
        how = _chunked if torch.is_grad_enabled() else _scoring
        losses, correct = how(hidden, weight, labels, vocab_start, padding_from, chunk, with_accuracy)
    return losses.transpose(0, 1), correct.transpose(0, 1) if with_accuracy else None


def token_losses(model, tokens, labels, position_ids=None, chunk: int = DEFAULT_CHUNK, with_accuracy: bool = True,
                 full_logits: bool = False, packed_seq_params=None):
    """Per-token loss (fp32) and next-token correctness, both [b, s] for this rank's tokens.

    ``tokens``/``labels``/``position_ids`` are this CP rank's slices ([b, s_local]).
    ``with_accuracy=False`` (training) skips the correctness work and returns (losses, None).
    ``full_logits``: the full path (see the module docstring); otherwise chunks of ``chunk`` tokens,
    recomputed in the backward pass where autograd is on, the scoring path where it is off.
    ``packed_seq_params``: the micro batch's documents (packing.Packing.pack), or None.
    """
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    processor = functools.partial(_processor, true_vocab=model.megarope_preset.vocab_size, chunk=chunk,
                                  with_accuracy=with_accuracy, full_logits=full_logits)
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

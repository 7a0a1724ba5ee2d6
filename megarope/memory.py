"""Training memory per GPU, on paper: what `megarope train --dry-run` prints before anything is built.

For one rank of a TP x CP x PP x DP layout, in bytes:
    weights        the parameters of the fullest pipeline stage, in the training dtype
    gradients      megatron DDP's gradient buffer: fp32 (grad_reduce_in_fp32), one value per parameter
    optimizer      the distributed optimizer's shard: fp32 master weights (bf16 training only) and
                   Adam's two moments, split over DP x CP (the group it shards over)
    activations    what the backward pass keeps, for the micro batches the first stage holds at once
                   under megatron's 1F1B schedule (min(PP, micro batches)), with and without recompute
    loss           the last stage's logits of one micro batch in the training dtype and the cross
                   entropy's fp32 buffer beside them (Transformer Engine's gradient, megatron's softmax):
                   all of this rank's tokens with full logits, one chunk of them with the chunked loss
    workspace      a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation

Activations of one LLaMA layer, per token of this rank (b*s/CP tokens) and per byte of the dtype,
with sequence parallelism splitting what is not already split over TP, and flash attention (no
[s x s] scores are kept): the two norm inputs and outputs (4h), the attention output (h), Q, K, V
((heads + 2 KV groups) x head dim) and the SwiGLU intermediates (gate and up, 2F, and their
product, F):  (5h + (n + 2g)d + 3F) / TP. With full recompute a layer keeps only its input (h / TP)
and one layer's activations exist at a time during its recompute. This is the accounting of
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4)
applied to the LLaMA layer; the workspace allowance is an assumption, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from megarope.loss import DEFAULT_CHUNK

GB = 1e9
WORKSPACE_BYTES = 5 * GB  # CUDA context (~0.5-1 GB), NCCL buffers, allocator fragmentation: an allowance
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def layer_parameters(preset, tp: int) -> int:
    """Parameters of one decoder layer on one TP rank (the two norm weights are replicated)."""
    h, d = preset.hidden_size, preset.head_dim
    qkv = h * (preset.num_heads + 2 * preset.num_query_groups) * d
    proj = preset.num_heads * d * h
    mlp = 3 * h * preset.ffn_hidden_size  # fc1 (gate and up) and fc2
    return (qkv + proj + mlp) // tp + 2 * h


def stage_parameters(preset, tp: int, pp: int) -> list[int]:
    """Parameters of each pipeline stage's rank: its layers, the embedding on the first stage, the
    final norm and output layer on the last (both vocabulary-parallel over TP)."""
    layers = preset.num_layers // pp
    vocab = preset.padded_vocab_size * preset.hidden_size // tp
    stages = [layers * layer_parameters(preset, tp) for _ in range(pp)]
    stages[0] += vocab
    stages[-1] += vocab + preset.hidden_size
    return stages


def model_parameters(preset) -> int:
    """Parameters of the whole model (vocabulary padded as megarope.model pads it)."""
    return sum(stage_parameters(preset, tp=1, pp=1))


def layer_activation_bytes(preset, tokens: int, tp: int, dtype_bytes: int, recompute: bool) -> int:
    """What one layer keeps for the backward pass, for ``tokens`` tokens of this CP rank."""
    h, d, f = preset.hidden_size, preset.head_dim, preset.ffn_hidden_size
    if recompute:
        return tokens * h * dtype_bytes // tp
    return tokens * (5 * h + (preset.num_heads + 2 * preset.num_query_groups) * d + 3 * f) * dtype_bytes // tp


def loss_bytes(preset, tokens: int, tp: int, dtype_bytes: int, full_logits: bool, chunk: int = DEFAULT_CHUNK) -> int:
    """The loss's logits and the cross entropy's fp32 buffer, for ``tokens`` tokens of one micro batch on this
    rank (micro batch x sequence / CP; sequence parallelism gathers them all for the output layer)."""
    rows = tokens if full_logits else min(tokens, chunk)
    return rows * (preset.padded_vocab_size // tp) * (dtype_bytes + 4)


@dataclass(frozen=True)
class TrainingMemory:
    parameters: int  # on the fullest rank
    weights: float
    gradients: float
    optimizer: float
    activations: float  # without recompute
    activations_recompute: float
    workspace: float = WORKSPACE_BYTES
    in_flight: int = 1  # micro batches whose activations the first stage holds at once
    loss_full: float = 0.0  # the loss with full logits
    loss_chunked: float = 0.0  # the chunked loss

    def total(self, recompute: bool, full_logits: bool = False) -> float:
        return (self.weights + self.gradients + self.optimizer + self.workspace
                + (self.activations_recompute if recompute else self.activations)
                + (self.loss_full if full_logits else self.loss_chunked))


def choose_loss(estimate: TrainingMemory, recompute: bool, budget_bytes: float, forced: str = "auto") -> tuple[bool, str]:
    """(full logits or not, why) for train.loss = ``forced``: "auto" takes full logits where the whole estimate
    with them fits ``budget_bytes`` (one GPU's memory: parallel.gpu_memory_gb), the chunked loss where not."""
    if forced != "auto":
        return forced == "full", f"train.loss: {forced}"
    need = estimate.total(recompute, full_logits=True)
    if need <= budget_bytes:
        return True, f"they fit: estimated {need / GB:.1f} of {budget_bytes / GB:.1f} GB"
    return False, f"full logits ({estimate.loss_full / GB:.1f} GB) would not fit: estimated {need / GB:.1f} of " \
                  f"{budget_bytes / GB:.1f} GB"


def estimate_training_memory(preset, *, tp: int, cp: int, pp: int, dp: int, seq_len: int, micro_batch: int,
                             num_micro: int, dtype: str, distributed_optimizer: bool = True) -> TrainingMemory:
    """Memory per GPU of the fullest rank (see the module docstring)."""
    width = DTYPE_BYTES[dtype]
    params = max(stage_parameters(preset, tp, pp))
    state = (4 if dtype != "fp32" else 0) + 8  # fp32 masters of bf16 weights, exp_avg, exp_avg_sq
    optimizer = params * state / (dp * cp if distributed_optimizer else 1)
    tokens = micro_batch * seq_len // cp
    layers = preset.num_layers // pp
    in_flight = min(pp, num_micro)
    full = layer_activation_bytes(preset, tokens, tp, width, recompute=False)
    kept = layer_activation_bytes(preset, tokens, tp, width, recompute=True)
    loss = {f: loss_bytes(preset, seq_len // cp, tp, width, f) * micro_batch for f in (True, False)}
    return TrainingMemory(parameters=params, weights=params * width, gradients=params * 4, optimizer=optimizer,
                          activations=in_flight * layers * full,
                          activations_recompute=in_flight * layers * kept + full, in_flight=in_flight,
                          loss_full=loss[True], loss_chunked=loss[False])

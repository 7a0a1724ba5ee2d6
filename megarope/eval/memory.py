"""How much memory scoring a sequence takes, per rank, and the --max-memory check built on it.

estimate_eval_memory counts the tensors alive at the widest moment of each phase of one decoder
layer under inference (one layer's activations at a time, eval.scoring) on top of the weights and
the residual stream. An estimate that counts tensors, not a measurement: benchmarks/eval_scaling.py
checks it against measured peaks on a CPU (docs/benchmarks.md), and allocator overhead and
fragmentation come on top.

How ``llama-1b`` (22 layers, hidden 2048, GQA with 4 KV groups of 64, ffn 5632, vocab 32000)
evaluates 1M tokens on one 80 GB GPU in bf16 (``estimate_eval_memory(get_preset("llama-1b"), 2**20, 2)``;
an estimate: no GPU has run it yet):
  weights                                                                   2.2 GB
  residual stream: the embedding output, which GPTModel holds through the
    decoder, and the current layer's input: 2 x 1M x 2048 x 2 B           =  8.6 GB
  attention phase (one layer): its normed input (4.3 GB); qkv 1M x 2560, RoPE'd q/k and RoPE
    temporaries, the core output: about 1M x 11000 x 2 B (23.1 GB)        = 27.4 GB
    (K/V themselves are 1M x 2 x 256 x 2 B = 1.1 GB per layer; no KV cache is kept across layers)
  MLP phase: the hidden state after attention and its norm (8.6 GB), chunks of 32K tokens:
    32K x 5 x 5632 x 2 B (1.8 GB), the chunks' outputs gathered (4.3 GB)  = 14.7 GB
    (unchunked the MLP alone would be 1M x 5 x 5632 x 2 B = 59 GB: the reason for chunking)
  loss phase: the final norm's output (4.3 GB), one 4096-token chunk's logits buffer
    in bf16 and its fp32 log-softmax (0.8 GB; loss.py's scoring path)     =  5.1 GB
  rotary table (fp32) and token ids                                        =  0.3 GB
  peak ~ weights + residual + max(attention, MLP, loss) + table           = 38.5 GB
so a single H100 80GB holds 1M tokens with room to spare, and about 2M before it is full; beyond
that, CP splits the sequence. (On an H200 the 2-layer version of this shape peaked at 1M at 0.885 of its
estimate: the GPU validation's long_eval.) Under CP every per-token term divides by CP; what the
context-parallel attention adds is its fp32 merge buffers (the running output and one part's weighted output) and
K/V: all of them with the all-gather (S x 2 x kv_heads x head_dim), two ranks' worth with the ring.
Compute is the real limit at 1M: the attention is ~ 4 * 22 layers * 2048 * (1M)^2 / 2 FLOPs ~ 1e17,
minutes on one H100 (the 2-layer shape, 9e15 FLOPs, took 22.5 s on an H200).

llama2-7b (32 layers, hidden 4096, 32 heads of 128 without GQA, ffn 11008) at 512K tokens:
weights 13.5 GB, residual 8.6 GB, attention phase 38.7 GB (the normed input 4.3 GB, QKV 12.9 GB,
RoPE'd q/k 8.6 GB and its temporaries, the core output 4.3 GB), MLP phase 16.5 GB (32K-token chunks:
3.6 GB each), loss 5.2 GB: peak 61.0 GB, so one 80 GB GPU holds it (benchmarks/gpu_long_eval.py
scores it there). Per layer only [S x hidden]-wide tensors are ever whole: the QKV projection's
output, q and k after RoPE and the attention's output, which the attention kernel needs whole (it
reads all of K/V for every query); the MLP, whose fc1 output is [S x 2 ffn], never is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from megarope.attention import resolve_cp_comm
from megarope.errors import UsageError
from megarope.eval.scoring import BATCH_TOKENS, MLP_CHUNK
from megarope.loss import DEFAULT_CHUNK
from megarope.units import format_tokens

GB = 1e9  # --max-memory is in GB (10^9 bytes), as GPU memory is quoted
_MAX_CP = 1024


def estimate_eval_memory(preset, length: int, dtype_bytes: int = 2, tp: int = 1, cp: int = 1,
                         loss_chunk: int = DEFAULT_CHUNK, mlp_chunk: int | None = MLP_CHUNK, cp_comm: str = "auto",
                         sequences: int = 1) -> dict[str, int]:
    """Bytes per rank that scoring ``sequences`` sequences of ``length`` tokens needs, by part, and the ``peak``.

    ``cp_comm`` is the context-parallel attention's way of passing K/V ("auto", "all-gather", "ring";
    see megarope.attention). An estimate: allocator overhead and fragmentation are not included.
    """
    b, tokens = dtype_bytes, sequences * length
    s = tokens // cp
    h, ffn, hd = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    qd, kvd, vocab = preset.num_heads * hd, preset.num_query_groups * hd, preset.padded_vocab_size
    layer_params = h * (qd + 2 * kvd) + qd * h + h * 2 * ffn + ffn * h
    params = preset.num_layers * (layer_params / tp + 2 * h) + 2 * vocab * h / tp + h
    stream = b * s * h  # one hidden state of the residual stream
    # qkv out and the RoPE'd q and k stay alive through the attention; RoPE itself makes ~2 q-sized
    # temporaries and the core writes a q-sized output
    qkv_and_rope = (qd + 2 * kvd) + (qd + kvd)
    core = b * s / tp * (qkv_and_rope + 2 * qd + qd)
    if cp > 1:  # the widest moment is a merge: packed local K/V, the fp32 running output and weighted
        # part, one part's output, and the visiting K/V (all of them, or one other rank's on the ring)
        visiting = cp if resolve_cp_comm(cp_comm, cp) == "all-gather" else 1
        merge = b * (qkv_and_rope + 2 * kvd + qd + visiting * 2 * kvd) + 4 * 2 * qd
        core = max(core, s / tp * merge)
    chunk = s if not mlp_chunk else min(s, mlp_chunk)
    mlp = b * chunk * 5 * ffn / tp + (stream if chunk < s else 0)  # chunk outputs gathered into one
    parts = {
        "weights": int(params * b),
        # the embedding output (GPTModel holds it through the decoder) and the current layer's input
        "residual": int(2 * stream),
        "attention": int(stream + core),  # + the normed input
        "mlp": int(2 * stream + mlp),  # + the hidden state after attention and its norm
        # + the final norm's output; one chunk's logits buffer (dtype) and, below fp32, its fp32 log-softmax (loss.py)
        "loss": int(stream + min(length // cp, loss_chunk) * sequences * (vocab / tp * (b + 4 * (b != 4)) + h * 4)),
        "rotary_and_ids": int(s * hd * 4 + 3 * s * 8 + s * 5),  # this rank's fp32 table; tokens, labels, positions
    }
    parts["peak"] = (parts["weights"] + parts["residual"] + max(parts["attention"], parts["mlp"], parts["loss"])
                     + parts["rotary_and_ids"])
    return parts


def _forward_shape(length: int, window: int | None, batch_tokens: int) -> tuple[int, int]:
    """(sequences, tokens each) of the widest forward pass that scoring ``length`` makes."""
    scored = window if window is not None and window < length else length
    return max(1, batch_tokens // scored), scored


def estimated_peak(preset, length: int, dtype_bytes: int = 2, tp: int = 1, cp: int = 1, cp_comm: str = "auto",
                   window: int | None = None, batch_tokens: int = BATCH_TOKENS) -> float:
    """Bytes per rank at the widest forward pass that scoring ``length`` makes (what --max-memory checks)."""
    sequences, scored = _forward_shape(length, window, batch_tokens)
    return estimate_eval_memory(preset, scored, dtype_bytes, tp, cp, cp_comm=cp_comm, sequences=sequences)["peak"]


def _longest_fitting(preset, length, window, batch_tokens, dtype_bytes, tp, cp, cp_comm, limit) -> int | None:
    """The longest length <= ``length`` that fits, a multiple of 2*CP*TP (and of 1024 where it can be)."""
    unit = 2 * cp * tp
    round_unit = unit * 1024 // math.gcd(unit, 1024)
    step = round_unit if length >= round_unit else unit
    lo, hi = 0, length // step  # multiples of step: lo fits (0 = none), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimated_peak(preset, mid * step, dtype_bytes, tp, cp, cp_comm, window, batch_tokens) <= limit:
            lo = mid
        else:
            hi = mid
    return lo * step or None


def _comm_that_fits(preset, length, window, batch_tokens, dtype_bytes, tp, cp, cp_comm, limit) -> str | None:
    """The K/V passing under which ``length`` fits (the ring where only it does), or None."""
    modes = [cp_comm] if cp_comm != "auto" or cp == 1 else ["auto", "ring"]
    for mode in modes:
        if estimated_peak(preset, length, dtype_bytes, tp, cp, mode, window, batch_tokens) <= limit:
            return mode
    return None


def check_max_memory(presets: dict[str, object], lengths: Sequence[int], max_memory_gb: float, dtype_bytes: int,
                     tp: int = 1, cp: int = 1, cp_comm: str = "auto", window: int | None = None,
                     batch_tokens: int = BATCH_TOKENS, limit_name: str = "--max-memory") -> str:
    """Refuse, in one line, an evaluation whose estimated peak per rank exceeds ``max_memory_gb`` (the
    setting the line names: ``limit_name``).

    ``presets`` maps each model's label to its preset. Returns the K/V passing to use: ``cp_comm``,
    or "ring" where "auto" would all-gather K/V that do not fit and the ring does. The error names
    the longest length that fits at this layout and the smallest CP that fits the length asked for.
    """
    if not max_memory_gb > 0:
        raise UsageError(f"{limit_name} must be positive, got {max_memory_gb:g}")
    limit = max_memory_gb * GB
    chosen = cp_comm
    for label, preset in presets.items():
        for length in sorted(set(lengths), reverse=True):
            mode = _comm_that_fits(preset, length, window, batch_tokens, dtype_bytes, tp, cp, cp_comm, limit)
            if mode is not None:
                chosen = "ring" if mode == "ring" else chosen
                break  # shorter lengths need less
            need = estimated_peak(preset, length, dtype_bytes, tp, cp, cp_comm, window, batch_tokens) / GB
            longest = _longest_fitting(preset, length, window, batch_tokens, dtype_bytes, tp, cp,
                                       "ring" if cp > 1 and cp_comm == "auto" else cp_comm, limit)
            fits = [f"the longest length that fits at CP {cp} is {format_tokens(longest)}" if longest
                    else f"no length fits at TP {tp} x CP {cp}"]
            needed = next((c for c in range(cp + 1, _MAX_CP + 1) if length % (2 * c * tp) == 0
                           and _comm_that_fits(preset, length, window, batch_tokens, dtype_bytes, tp, c, cp_comm,
                                               limit)), None)
            if needed:
                fits.append(f"CP {needed} fits {format_tokens(length)}")
            raise UsageError(f"{label} at {format_tokens(length)} tokens needs an estimated {need:.1f} GB per rank "
                             f"(TP {tp} x CP {cp}, {8 * dtype_bytes}-bit weights), over {limit_name} "
                             f"{max_memory_gb:g} GB: {'; '.join(fits)}")
    return chosen

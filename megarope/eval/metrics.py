"""What a record reports, from per-position sums: loss, perplexity, accuracy, log-spaced position
buckets, and the measured break point of a loss curve.

Position buckets are log-spaced over the *target* position t (the token predicted from t tokens of
context): [0, L0), [L0, 2*L0), [2*L0, 4*L0), ... (L0 = ``bucket0``, 128 by default). A length's loss
is the mean over all scored positions of all documents, ppl = exp(loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_BUCKET0 = 128


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float."""
    return math.exp(loss) if loss < 700 else float("inf")


def bucket_edges(length: int, first: int = DEFAULT_BUCKET0) -> list[int]:
    """[0, L0, 2*L0, 4*L0, ..., length]: log-spaced target-position buckets."""
    edges, edge = [0], first
    while edge < length:
        edges.append(edge)
        edge *= 2
    return edges + [length]


def summarize(loss_sum: torch.Tensor, correct_sum: torch.Tensor, n_docs: int, bucket0: int = DEFAULT_BUCKET0,
              positions: bool = False, break_after: int | None = None) -> dict:
    """Per-position sums over ``n_docs`` documents ([L-1], index t-1 = target t) -> the record's numbers.

    With ``positions``, also "position_loss": the mean loss at every target position (index t-1 = target t).
    With ``break_after`` (the model's tuning length), also "measured_break": measured_break of that curve,
    None where the curve is no longer than ``break_after``.
    """
    length = loss_sum.shape[0] + 1
    if n_docs == 0:
        nan = float("nan")
        return {"loss": nan, "ppl": nan, "accuracy": nan, "n_tokens": 0, "buckets": [],
                **({"position_loss": []} if positions else {}),
                **({"measured_break": None} if break_after is not None else {})}
    mean_loss = float(loss_sum.sum()) / (n_docs * (length - 1))
    buckets = []
    edges = bucket_edges(length, bucket0)
    for lo, hi in zip(edges[:-1], edges[1:]):
        a, b = max(lo, 1) - 1, hi - 1  # targets max(lo,1)..hi-1
        if b <= a:
            continue
        bucket_loss = float(loss_sum[a:b].sum()) / (n_docs * (b - a))
        buckets.append({"start": lo, "end": hi, "loss": bucket_loss, "ppl": perplexity(bucket_loss),
                        "accuracy": float(correct_sum[a:b].sum()) / (n_docs * (b - a)), "n_tokens": n_docs * (b - a)})
    out = {"loss": mean_loss, "ppl": perplexity(mean_loss),
           "accuracy": float(correct_sum.sum()) / (n_docs * (length - 1)),
           "n_tokens": n_docs * (length - 1), "buckets": buckets}
    if positions:
        out["position_loss"] = (loss_sum / n_docs).tolist()
    if break_after is not None:
        out["measured_break"] = (measured_break(loss_sum / n_docs, break_after)
                                 if length - 1 >= break_after >= 2 else None)
    return out


def measured_break(position_loss: Sequence[float], train_len: int, rise: float = 1.0) -> int | None:
    """Where a model breaks: the first target position p >= ``train_len`` at which the loss, averaged
    over a quarter-octave window around p ([p / 2^(1/8), p * 2^(1/8)]), is

      * at least ``rise`` nats above the in-length level (the mean loss over targets train_len/2 ..
        train_len-1), and
      * at least ``rise`` nats above the same windowed loss one octave earlier, at p/2.

    The first condition says the model has lost what it could do inside its training length; the
    second that it lost it abruptly (a cliff, as past the bound of eq. 16b) rather than by the slow,
    smooth rise of a base below beta_3, which never counts as a break. None when there is no such p.
    ``position_loss`` is a record's per-position curve (index t-1 = target t; perplexity.run(...,
    positions=True)); every evaluation record carries the break of its own curve (summarize's break_after).
    """
    curve = torch.as_tensor(position_loss, dtype=torch.float64).flatten()
    n = curve.numel()
    if train_len < 2 or n < train_len:
        raise ValueError(f"need a curve of at least train_len = {train_len} positions, got {n}")
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), curve.cumsum(0)])

    def windowed(p: torch.Tensor) -> torch.Tensor:  # mean over targets lo..hi (1-based), clipped to the curve
        lo = torch.floor(p / 2 ** 0.125).clamp(min=1).long()
        hi = torch.ceil(p * 2 ** 0.125).clamp(max=n).long()
        return (sums[hi] - sums[lo - 1]) / (hi - lo + 1)

    baseline = float(curve[train_len // 2 - 1:train_len - 1].mean())
    p = torch.arange(train_len, n + 1, dtype=torch.float64)  # every candidate at once, in one pass
    level = windowed(p)
    broken = (level >= baseline + rise) & (level - windowed(torch.floor(p / 2)) >= rise)
    first = torch.nonzero(broken)
    return int(p[first[0, 0]]) if first.numel() else None

"""The scaling law of RoPE-based extrapolation (Liu et al., 2023), as plain math.

Notation follows the paper: head dimension ``d``; pretraining length ``T_train`` (with the
pretraining base, 10000 for LLaMA); continued-training ("tuning") length ``T_tune`` and base
``beta``. Pair n of a head rotates with period ``T_n = 2*pi * base**(2n/d)``.

Nothing here imports torch: the planner runs anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TWO_PI = 2.0 * math.pi
LLAMA_PRETRAIN_BASE = 10000.0

ABOVE_CRITICAL = "above beta_0"
AT_MOST_CRITICAL = "at most beta_0"
BELOW_BETA3 = "below beta_3"


def _check_head_dim(head_dim: int) -> None:
    if int(head_dim) != head_dim or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be an even integer >= 2, got {head_dim}")


def _check_length(name: str, length: float) -> None:
    if not length > TWO_PI:
        raise ValueError(f"{name} must be longer than 2*pi tokens, got {length}")


def _check_base(name: str, base: float) -> None:
    if not base > 1:
        raise ValueError(f"{name} must be > 1, got {base}")


def _check_lengths(train_len: float, tune_len: float) -> None:
    _check_length("train_len", train_len)
    _check_length("tune_len", tune_len)
    if tune_len < train_len:
        raise ValueError(f"tune_len ({tune_len}) must be >= train_len ({train_len})")


def rotary_dim(head_dim: int, rotary_percent: float = 1.0) -> int:
    """The d of the law: the dimensions of a head that rotate, int(head_dim * rotary_percent) as megatron takes them."""
    if not 0 < rotary_percent <= 1:
        raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent}")
    if rotary_percent == 1.0:
        _check_head_dim(head_dim)
        return head_dim
    d = int(head_dim * rotary_percent)
    if d < 2 or d % 2:
        raise ValueError(f"the rotary dimension int({head_dim} x {rotary_percent:g}) = {d} must be even and >= 2")
    return d


def rotary_periods(head_dim: int, base: float) -> list[float]:
    """Period in tokens of each rotary pair: T_n = 2*pi * base^(2n/d)."""
    _check_head_dim(head_dim)
    _check_base("base", base)
    return [TWO_PI * base ** (2 * n / head_dim) for n in range(head_dim // 2)]


def _dims_with_full_period(head_dim: int, base: float, length: float) -> int:
    # 2 * ceil((d/2) * log_base(length / 2pi)), capped at d: the number of dimensions whose
    # period fits inside ``length``. The ceiling counts pair n = 0 .. floor(.) inclusive.
    inner = (head_dim / 2) * math.log(length / TWO_PI) / math.log(base)
    return min(head_dim, 2 * math.ceil(inner - 1e-12))


def critical_dimension(head_dim: int, train_len: float, pretrain_base: float = LLAMA_PRETRAIN_BASE) -> int:
    """Lemma 1, eq. (13): d_extra = 2 * ceil((d/2) * log_10000(T_train / 2pi)).

    The first d_extra dimensions saw a full period during pretraining; the rest did not.
    """
    _check_head_dim(head_dim)
    _check_length("train_len", train_len)
    _check_base("pretrain_base", pretrain_base)
    return _dims_with_full_period(head_dim, pretrain_base, train_len)


def critical_base(train_len: float, tune_len: float | None = None, pretrain_base: float = LLAMA_PRETRAIN_BASE) -> float:
    """Theorem 3, eq. (16a): beta_0 = 10000 ^ log_{T_train/2pi}(T_tune/2pi)."""
    tune_len = train_len if tune_len is None else tune_len
    _check_lengths(train_len, tune_len)
    _check_base("pretrain_base", pretrain_base)
    exponent = math.log(tune_len / TWO_PI) / math.log(train_len / TWO_PI)
    return pretrain_base**exponent


def extrapolation_bound(head_dim: int, train_len: float, base: float, pretrain_base: float = LLAMA_PRETRAIN_BASE) -> float:
    """Theorem 3, eq. (16b): T_extra = 2pi * beta^(d_extra / d), valid for beta > beta_0."""
    _check_base("base", base)
    d_extra = critical_dimension(head_dim, train_len, pretrain_base)
    return TWO_PI * base ** (d_extra / head_dim)


def tuned_critical_dimension(head_dim: int, tune_len: float, base: float) -> int:
    """Theorem 3, eq. (16c): d'_extra = 2 * ceil((d/2) * log_beta(T_tune / 2pi)), capped at d."""
    _check_head_dim(head_dim)
    _check_length("tune_len", tune_len)
    _check_base("base", base)
    return _dims_with_full_period(head_dim, base, tune_len)


def small_base_thresholds(tune_len: float) -> tuple[float, float, float]:
    """Theorem 3, eq. (16d): beta_1 = 2T/pi, beta_2 = T/pi, beta_3 = T/(2pi) for T = T_tune."""
    _check_length("tune_len", tune_len)
    return 2 * tune_len / math.pi, tune_len / math.pi, tune_len / TWO_PI


def base_for_context(head_dim: int, train_len: float, target_len: float, pretrain_base: float = LLAMA_PRETRAIN_BASE) -> float:
    """Eq. (16b) inverted: the base whose bound is ``target_len``, beta = (T / 2pi)^(d / d_extra)."""
    _check_length("target_len", target_len)
    d_extra = critical_dimension(head_dim, train_len, pretrain_base)
    return (target_len / TWO_PI) ** (head_dim / d_extra)


@dataclass(frozen=True)
class BasePlan:
    """What Theorem 3 says about tuning with one base."""

    base: float
    regime: str
    critical_dim: int
    extrapolation_bound: float | None  # None: no hard bound (beta < beta_3)


def plan_base(head_dim: int, train_len: float, base: float, tune_len: float | None = None,
              pretrain_base: float = LLAMA_PRETRAIN_BASE) -> BasePlan:
    """Classify ``base`` by Theorem 3 and give the critical dimension and bound in force."""
    tune_len = train_len if tune_len is None else tune_len
    beta_0 = critical_base(train_len, tune_len, pretrain_base)
    _check_base("base", base)
    if base > beta_0:
        return BasePlan(base, ABOVE_CRITICAL, critical_dimension(head_dim, train_len, pretrain_base),
                        extrapolation_bound(head_dim, train_len, base, pretrain_base))
    d_tuned = tuned_critical_dimension(head_dim, tune_len, base)
    if base < small_base_thresholds(tune_len)[2]:
        return BasePlan(base, BELOW_BETA3, d_tuned, None)
    return BasePlan(base, AT_MOST_CRITICAL, d_tuned, float(tune_len))

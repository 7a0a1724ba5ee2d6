import math

import pytest

from megarope import scaling

LLAMA2 = dict(head_dim=128, train_len=4096)


def test_critical_dimension_llama2():
    # Lemma 1: the inner value is 45.03, so d_extra = 2 * 46 = 92.
    assert scaling.critical_dimension(**LLAMA2) == 92


def test_bound_for_base_1e6_is_about_129k():
    bound = scaling.extrapolation_bound(base=1e6, **LLAMA2)
    assert abs(bound - 129_000) / 129_000 < 0.01


@pytest.mark.parametrize("base, expected", [(5e5, 78_000), (1e4, 4_700)])
def test_other_derived_bounds(base, expected):
    assert abs(scaling.extrapolation_bound(base=base, **LLAMA2) - expected) / expected < 0.01


def test_small_base_thresholds():
    assert [round(b) for b in scaling.small_base_thresholds(4096)] == [2608, 1304, 652]
    assert [round(b) for b in scaling.small_base_thresholds(16384)] == [10430, 5215, 2608]


def test_critical_base():
    assert scaling.critical_base(4096) == pytest.approx(10000)
    assert abs(scaling.critical_base(4096, 16384) - 71_700) / 71_700 < 0.01


def test_toy_scale_prediction():
    # ../toy-scale: d=32, T_train=128 -> d_extra 12, bound(1e6) about 1117
    assert scaling.critical_dimension(32, 128) == 12
    assert scaling.extrapolation_bound(32, 128, 1e6) == pytest.approx(1117, abs=1)
    # eq. (13) at d=64, T_train=256: 2 * ceil(32 * log_10000(40.7)) = 2 * ceil(12.88) = 26
    assert scaling.critical_dimension(64, 256) == 26


def test_tuned_critical_dimension_grows_as_base_shrinks():
    dims = [scaling.tuned_critical_dimension(128, 4096, b) for b in (10000, 2608, 1304, 700)]
    assert dims == sorted(dims) and dims[0] >= 92
    assert scaling.tuned_critical_dimension(128, 4096, 500) == 128  # below beta_3: every pair completes a period


def test_bound_grows_with_base():
    bases = [1.2e4 * 1.5**k for k in range(30)]
    bounds = [scaling.extrapolation_bound(base=b, **LLAMA2) for b in bases]
    assert all(a < b for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("target", [8192, 32768, 131072, 1_048_576])
def test_inversion_round_trips(target):
    base = scaling.base_for_context(128, 4096, target)
    assert scaling.extrapolation_bound(128, 4096, base) == pytest.approx(target, rel=1e-9)


def test_plan_regimes():
    above = scaling.plan_base(128, 4096, 1e6)
    assert (above.regime, above.critical_dim) == (scaling.ABOVE_CRITICAL, 92)
    at_most = scaling.plan_base(128, 4096, 2000)
    assert at_most.regime == scaling.AT_MOST_CRITICAL and at_most.extrapolation_bound == 4096
    below = scaling.plan_base(128, 4096, 500)
    assert below.regime == scaling.BELOW_BETA3 and below.extrapolation_bound is None
    assert scaling.plan_base(128, 4096, 1e6, tune_len=16384).regime == scaling.ABOVE_CRITICAL
    assert scaling.plan_base(128, 4096, 5e4, tune_len=16384).extrapolation_bound == 16384


def test_periods():
    periods = scaling.rotary_periods(4, 100.0)
    assert periods == pytest.approx([2 * math.pi, 2 * math.pi * 10])


@pytest.mark.parametrize("call, name", [
    (lambda: scaling.critical_dimension(127, 4096), "head_dim"),
    (lambda: scaling.critical_dimension(0, 4096), "head_dim"),
    (lambda: scaling.critical_dimension(128, 6), "train_len"),
    (lambda: scaling.extrapolation_bound(128, 4096, 1.0), "base"),
    (lambda: scaling.critical_base(4096, 2048), "tune_len"),
    (lambda: scaling.small_base_thresholds(3), "tune_len"),
    (lambda: scaling.base_for_context(128, 4096, 5), "target_len"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_rotary_dim():
    assert scaling.rotary_dim(128) == 128 and scaling.rotary_dim(128, 0.5) == 64 and scaling.rotary_dim(80, 0.25) == 20
    for head_dim, percent in ((127, 1.0), (128, 0.01), (100, 0.25)):
        with pytest.raises(ValueError):
            scaling.rotary_dim(head_dim, percent)

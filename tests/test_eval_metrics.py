"""Record metrics: log-spaced buckets, the summary of per-position sums, the measured break point."""

import math

import pytest
import torch

from megarope.eval.metrics import bucket_edges, measured_break, perplexity, summarize


def test_buckets_and_summary():
    assert bucket_edges(1024, 128) == [0, 128, 256, 512, 1024]
    assert bucket_edges(1000, 128) == [0, 128, 256, 512, 1000]
    assert bucket_edges(100, 128) == [0, 100]
    loss = torch.arange(1, 1024, dtype=torch.float64)  # position t-1 has loss t, summed over 2 docs
    s = summarize(2 * loss, torch.full((1023,), 2.0, dtype=torch.float64), n_docs=2, bucket0=128)
    assert s["n_tokens"] == 2 * 1023 and s["accuracy"] == 1.0
    assert s["loss"] == pytest.approx(512.0)
    assert [(b["start"], b["end"]) for b in s["buckets"]] == [(0, 128), (128, 256), (256, 512), (512, 1024)]
    assert s["buckets"][0]["loss"] == pytest.approx(64.0) and s["buckets"][0]["n_tokens"] == 2 * 127
    assert s["buckets"][-1]["loss"] == pytest.approx((512 + 1023) / 2)
    assert s["ppl"] == pytest.approx(math.exp(512.0))
    assert perplexity(1.0) == pytest.approx(math.e) and perplexity(800.0) == math.inf  # no OverflowError
    empty = summarize(torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64), 0, positions=True)
    assert math.isnan(empty["loss"]) and empty["n_tokens"] == 0 and empty["position_loss"] == []


def test_measured_break():
    assert measured_break([1.0] * 1023, 128) is None
    jump = [1.0] * 1150 + [3.0] * 1000  # a cliff of 2 nats at target 1151
    assert 1100 <= measured_break(jump, 128) <= 1160
    assert measured_break(jump, 128, rise=2.5) is None
    # smooth degradation: +0.5 nats per octave, 3 nats above the in-length level by 8K, never a cliff
    smooth = [1.0 if t <= 128 else 1.0 + 0.5 * math.log2(t / 128) for t in range(1, 8192)]
    assert measured_break(smooth, 128) is None
    # the same slow rise with a cliff on top is still found
    assert 1050 <= measured_break([x + (2.0 if t >= 1150 else 0.0) for t, x in enumerate(smooth)], 128) <= 1160
    with pytest.raises(ValueError):
        measured_break([1.0] * 100, 128)


def test_every_record_carries_the_break_of_its_own_curve():
    jump = torch.tensor([1.0] * 1150 + [3.0] * 1000, dtype=torch.float64)  # per-position means, as summarize sees them
    s = summarize(2 * jump, torch.zeros_like(jump), n_docs=2, break_after=128, positions=True)
    assert s["measured_break"] == measured_break(s["position_loss"], 128) == measured_break(jump, 128)
    short = summarize(2 * jump[:100], torch.zeros(100, dtype=torch.float64), n_docs=2, break_after=128)
    assert short["measured_break"] is None  # no position past the tuning length
    assert "measured_break" not in summarize(jump, torch.zeros_like(jump), n_docs=1)
    empty = summarize(torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64), 0, break_after=4)
    assert empty["measured_break"] is None

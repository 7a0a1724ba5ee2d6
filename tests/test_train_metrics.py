"""What a training step reports: metrics.jsonl lines (cut back on resume), MFU, the FLOPs a token costs."""

import json

import pytest

from megarope import config, memory, train_metrics
from megarope.model import get_preset
from megarope.train import StepResult, TrainState


def make_cfg(tmp_path, *overrides) -> config.Config:
    raw = {"model": {"preset": "toy"},
           "train": {"steps": 4, "seq_len": 64, "global_batch": 4, "micro_batch": 2, "warmup_steps": 1},
           "data": {"path": str(tmp_path / "never-read"), "tokenizer": "bytes"},
           "checkpoint": {"dir": str(tmp_path)}, "log": {"tensorboard": False, "every": 2}}
    return config.validate(config.apply_overrides(raw, list(overrides)))


def test_flops_per_token_are_six_per_weight_plus_causal_attention_scores():
    """6 FLOPs per weight a token touches (forward 2, backward 4); the input embedding is a lookup, not a GEMM."""
    preset = get_preset("llama2-7b")
    at_zero = train_metrics.flops_per_token(preset, 0)
    embedding = preset.padded_vocab_size * preset.hidden_size
    norms = (2 * preset.num_layers + 1) * preset.hidden_size
    assert at_zero == 6 * (memory.model_parameters(preset) - embedding - norms)
    slope = train_metrics.flops_per_token(preset, 4096) - train_metrics.flops_per_token(preset, 2048)
    assert slope == 6 * preset.num_layers * preset.hidden_size * 2048


def test_each_step_is_one_json_line_with_mfu_where_the_peak_is_known(tmp_path, capsys):
    cfg = make_cfg(tmp_path)
    flops_per_step, peak = 4e12, 1e12
    results = [StepResult(2.5, 1.0, 1e-3, True, False, seconds=2.0),
               StepResult(None, None, 1e-3, False, False, seconds=4.0)]  # a step whose loss was not finite
    with train_metrics.MetricsWriter(cfg, str(tmp_path), 0, flops_per_step, peak, world=2, progress=False) as writer:
        for step, result in enumerate(results, start=1):
            writer.write(TrainState(step=step, consumed_samples=4 * step), result)
    lines = [json.loads(line) for line in (tmp_path / train_metrics.METRICS).read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert lines[0]["mfu"] == pytest.approx(flops_per_step / 2.0 / 2 / peak)
    assert lines[0]["tokens_per_s"] == pytest.approx(4 * 64 / 2.0) and lines[0]["tokens"] == 4 * 64
    assert lines[1]["loss"] is None and lines[1]["skipped"] and lines[1]["grad_norm"] is None
    out = capsys.readouterr().out  # no terminal: a line every log.every steps
    assert out.startswith("step 2/4") and "(skipped: loss not finite)" in out and "MFU" in out


def test_without_a_known_peak_no_mfu_is_claimed(tmp_path):
    with train_metrics.MetricsWriter(make_cfg(tmp_path), str(tmp_path), 0, 4e12, None, 1, progress=False) as writer:
        writer.write(TrainState(step=1, consumed_samples=4), StepResult(2.5, 1.0, 1e-3, True, False, 1.0))
    assert "mfu" not in json.loads((tmp_path / train_metrics.METRICS).read_text())
    assert train_metrics.peak_flops(make_cfg(tmp_path, "log.peak_tflops=500"), "fp32") == 500e12
    assert train_metrics.peak_flops(make_cfg(tmp_path), "fp32") is None  # no GPU here, and no override


def test_a_resume_cuts_the_lines_written_after_its_checkpoint(tmp_path):
    """Steps 1-4 were logged, the checkpoint is step 2, and the crash cut the last line short."""
    path = tmp_path / train_metrics.METRICS
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 5)) + '{"step": 5, "lo')
    with train_metrics.MetricsWriter(make_cfg(tmp_path), str(tmp_path), 2, 1.0, None, 1, progress=False) as writer:
        writer.write(TrainState(step=3, consumed_samples=12), StepResult(2.0, 1.0, 1e-3, True, False, 1.0))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]

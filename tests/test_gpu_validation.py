"""benchmarks/gpu_validation.py --dry on the CPU: the GPU validation's script, its tests/gpu files (those that
need no Transformer Engine) and its benchmarks still run, and report every check, where no GPU ever runs them;
and benchmarks/gpu_long_eval.py, the long-sequence row it has no time for."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from megarope.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_dry_run_passes_every_check_and_writes_its_reports(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_validation.py", "--dry", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget", "1500", "--profile"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["log.txt", "profile.txt", "results.json", "results.md"]
    report = json.loads((out / "results.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["environment", "tests/gpu", "long_eval", "throughput"]
    assert all(c["status"] == "pass" for c in checks.values()), {n: c["summary"] for n, c in checks.items()}
    tests = {t["test"].split("::")[1].split("[")[0]: t["outcome"] for t in checks["tests/gpu"]["tests"]}
    assert tests["test_a_checkpoint_of_one_backend_gives_the_same_logits_in_the_other"] == "passed"
    assert tests["test_a_run_stopped_and_resumed_equals_one_that_never_stopped"] == "passed"
    assert tests["test_the_fp8_forward_follows_each_optimizer_step_through_megatrons_schedule"] == "skipped"
    long_eval = checks["long_eval"]
    assert [r["length"] for r in long_eval["rows"]] == [1024, 2048]
    assert all(r["seconds"] > 0 and r["first_seconds"] > 0 for r in long_eval["rows"])  # warm, and the first call
    assert [r["length"] for r in long_eval["peer"]] == [1024, 2048] and all(r["time_ratio"] > 0 for r in long_eval["peer"])
    (row,) = checks["throughput"]["rows"]  # one shape, one precision on a CPU
    assert list(row["specs"]) == ["megarope", "stock", "megarope, log-scaled attention", "megarope, dynamic NTK"]
    assert all(len(spec["round_s"]) == row["rounds"] for spec in row["specs"].values())
    assert all(row["specs"][label]["vs_stock"] > 0 for label in row["specs"] if label != "stock")
    assert row["megarope_loss"] == "full logits" and row["warmup_steps"] >= 1
    markdown = (out / "results.md").read_text()
    assert "| check | status | seconds | summary |" in markdown and "## Long-sequence evaluation" in markdown
    assert "megarope / transformers: time" in markdown and "After 1 warm-up steps each" in markdown
    profile = (out / "profile.txt").read_text()
    assert profile.count("top kernels of one training step") == 4 and "aten::mm" in profile


def _long_eval_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_long_eval", os.path.join(REPO, "benchmarks", "gpu_long_eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_long_eval_benchmark_scores_small_and_refuses_what_its_memory_cap_cannot_hold():
    """benchmarks/gpu_long_eval.py (the 7B 512K row): --dry scores the toy preset; a cap the estimate exceeds is
    refused before any model is built."""
    bench = _long_eval_benchmark()
    result = bench.main(["--dry"])
    assert result["length"] == 2048 and result["calls"][0]["seconds"] > 0 and result["calls"][0]["loss"] > 0
    with pytest.raises(UsageError, match="llama2-7b at 512K tokens needs an estimated"):
        bench.main(["--max-memory", "40"])

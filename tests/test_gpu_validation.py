"""benchmarks/gpu_validation.py --dry on the CPU: the GPU validation's script, its tests/gpu files (those that
need no Transformer Engine) and its benchmarks still run, and report every check, where no GPU ever runs them."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_the_dry_run_passes_every_check_and_writes_its_reports(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_validation.py", "--dry", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget", "1500"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["log.txt", "results.json", "results.md"]
    report = json.loads((out / "results.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["environment", "tests/gpu", "long_eval", "throughput"]
    assert all(c["status"] == "pass" for c in checks.values()), {n: c["summary"] for n, c in checks.items()}
    tests = {t["test"].split("::")[1].split("[")[0]: t["outcome"] for t in checks["tests/gpu"]["tests"]}
    assert tests["test_a_checkpoint_of_one_backend_gives_the_same_logits_in_the_other"] == "passed"
    assert tests["test_a_run_stopped_and_resumed_equals_one_that_never_stopped"] == "passed"
    assert tests["test_the_fp8_forward_follows_each_optimizer_step_through_megatrons_schedule"] == "skipped"
    assert [r["length"] for r in checks["long_eval"]["rows"]] == [1024, 2048]
    assert checks["throughput"]["rows"][0]["ratio"] > 0
    markdown = (out / "results.md").read_text()
    assert "| check | status | seconds | summary |" in markdown and "## Long-sequence evaluation" in markdown

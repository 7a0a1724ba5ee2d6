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
    assert list(checks) == ["environment", "tests/gpu", "packed", "long_eval", "throughput"]
    assert all(c["status"] == "pass" for c in checks.values()), {n: c["summary"] for n, c in checks.items()}
    tests = {t["test"].split("::")[1].split("[")[0]: t["outcome"] for t in checks["tests/gpu"]["tests"]}
    assert tests["test_a_checkpoint_of_one_backend_gives_the_same_logits_in_the_other"] == "passed"
    assert tests["test_a_run_stopped_and_resumed_equals_one_that_never_stopped"] == "passed"
    assert tests["test_the_fp8_forward_follows_each_optimizer_step_through_megatrons_schedule"] == "skipped"
    assert [r["length"] for r in checks["long_eval"]["rows"]] == [1024, 2048]
    assert checks["packed"]["rows"][0]["max_abs_diff"] <= checks["packed"]["rows"][0]["tolerance"]
    assert checks["throughput"]["rows"][0]["ratio"] > 0
    markdown = (out / "results.md").read_text()
    assert "| check | status | seconds | summary |" in markdown and "## Long-sequence evaluation" in markdown


ORDER = """
import json, sys, types
import torch

events = []


class Seen:  # records every import of Transformer Engine that is tried (it is absent here)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformer_engine":
            events.append(name)


sys.meta_path.insert(0, Seen())
version = torch.backends.cudnn.version
torch.backends.cudnn.version = lambda: events.append(("cudnn", "megatron.core" in sys.modules)) or version()
sys.path.insert(0, "benchmarks")
import gpu_validation

result = {}
gpu_validation.child_environment(types.SimpleNamespace(dry=True), result, lambda: None)
print(json.dumps({"events": events, "result": result}))
"""


def test_the_environment_check_imports_transformer_engine_before_it_asks_for_cudnn():
    """As the CLI does (torch, then megatron-core, which imports Transformer Engine): cuDNN initialised first made
    TE load a system cuDNN's sub-libraries on the H200, where the CLI worked."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", ORDER], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    events = seen["events"]
    cudnn = [k for k, e in enumerate(events) if isinstance(e, list)]
    assert len(cudnn) == 1 and events[cudnn[0]] == ["cudnn", True]  # asked once, with megatron-core imported
    assert "transformer_engine" in events[:cudnn[0]]  # and Transformer Engine's import tried before
    assert seen["result"]["ok"] and "cudnn" in seen["result"]["environment"]

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
    assert list(checks) == ["environment", "tests/gpu", "multi_rank", "packed", "long_eval", "throughput"]
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
    rows = {row["layout"]: row for row in checks["multi_rank"]["rows"]}
    assert {name: row["status"] for name, row in rows.items()} == {
        "tp2-te-sp": "pass", "cp2-te": "skipped", "cp2-local": "pass", "dp2": "pass", "pp2": "pass"}
    assert all(row["resumed_from_step"] == 1 for row in rows.values() if row["status"] == "pass")
    assert checks["multi_rank"]["bf16_fp32_gap"]["local"] > 0  # measured in the same run, on the CPU
    (packed,) = checks["packed"]["rows"]  # the local backend in fp32 on a CPU: each token's loss alone
    assert packed["max_abs_diff"] <= packed["tolerance"] < packed["crossing_max_abs_diff"] / 2
    markdown = (out / "results.md").read_text()
    assert "| check | status | seconds | summary |" in markdown and "## Long-sequence evaluation" in markdown
    assert "megarope / transformers: time" in markdown and "After 1 warm-up steps each" in markdown
    assert "## Several ranks on one GPU" in markdown
    profile = (out / "profile.txt").read_text()
    assert profile.count("top kernels of one training step") == 4 and "aten::mm" in profile


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
MIXED = "cuDNN version incompatibility: PyTorch was compiled  against (9, 19, 0) but found runtime version (9, 14, 0)."


def asked():
    events.append(("cudnn", "megatron.core" in sys.modules))
    if sys.argv[1:] == ["mixed"]:  # what torch said on the H200 once TE had loaded the system's sub-libraries
        raise RuntimeError(MIXED)
    return version()


torch.backends.cudnn.version = asked
sys.path.insert(0, "benchmarks")
import gpu_validation

result = {}
gpu_validation.child_environment(types.SimpleNamespace(dry=True), result, lambda: None)
print(json.dumps({"events": events, "result": result}))
"""


@pytest.mark.parametrize("loaded", ["torch's", "mixed"])
def test_the_environment_check_imports_transformer_engine_before_it_asks_for_cudnn(loaded):
    """As the CLI does (torch, then megatron-core, which imports Transformer Engine): cuDNN initialised first made
    TE load a system cuDNN's sub-libraries on the H200, where the CLI worked. Imported in this order, TE loaded
    torch's libcudnn.so.9 with the system's sub-libraries there, and torch's own version check then refused: the
    check reports that (and where cuDNN came from) and does not fail on it, as the CLI runs in that state."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", ORDER, loaded], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    events = seen["events"]
    cudnn = [k for k, e in enumerate(events) if isinstance(e, list)]
    assert len(cudnn) == 1 and events[cudnn[0]] == ["cudnn", True]  # asked once, with megatron-core imported
    assert "transformer_engine" in events[:cudnn[0]]  # and Transformer Engine's import tried before
    environment = seen["result"]["environment"]
    assert seen["result"]["ok"] and isinstance(environment["cudnn_dirs"], list)
    if loaded == "mixed":
        assert environment["cudnn"].startswith("RuntimeError: cuDNN version incompatibility")
        assert "warning: cuDNN RuntimeError: cuDNN version incompatibility" in seen["result"]["summary"]
    else:
        assert environment["cudnn"] is None or isinstance(environment["cudnn"], int)


# ----------------------------------------------------------------------------------------------- multi_rank's logic
def _multi_rank():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import multi_rank
    finally:
        sys.path.pop(0)
    return multi_rank


NCCL_REFUSAL = """Traceback (most recent call last):
  File "/site/torch/distributed/distributed_c10d.py", line 4811, in barrier
    work = group.barrier(opts=opts)
torch.distributed.DistBackendError: NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:94, invalid usage
ncclInvalidUsage: This usually reflects invalid usage of NCCL library.
Last error:
Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000"""
TE_REFUSAL = """Traceback (most recent call last):
  File "/repo/megarope/train.py", line 470, in train_step
    reports = self.forward_backward(forward_step_func=self._forward_step, data_iterator=data_iterators,
  File "/site/transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py", line 1402, in forward
    raise ValueError("No dot product attention backend is available for the provided inputs.")
ValueError: No dot product attention backend is available for the provided inputs."""
OUR_ERROR = """Traceback (most recent call last):
  File "/repo/megarope/train.py", line 470, in train_step
    raise RuntimeError("a bug of ours")
RuntimeError: a bug of ours"""


def test_a_layout_that_nccl_or_te_refuses_is_skipped_with_their_message_and_any_other_error_fails():
    mr = _multi_rank()
    assert mr.refused_by(NCCL_REFUSAL) == "NCCL" and mr.refused_by(TE_REFUSAL) == "Transformer Engine"
    assert mr.refused_by(OUR_ERROR) is None
    assert mr.error_message(NCCL_REFUSAL).endswith(
        "Last error: / Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1a000")
    outcome = {"backend": "te", "dtype": "bf16"}
    for error, status, reason in ((NCCL_REFUSAL, "skipped", "NCCL refused: torch.distributed.DistBackendError: "),
                                  (TE_REFUSAL, "skipped", "Transformer Engine refused: ValueError: No dot product"),
                                  (OUR_ERROR, "error", "RuntimeError: a bug of ours")):
        row = mr.compare("cp2-te", {**outcome, "error": error}, {}, {}, 4)
        assert row["status"] == status and row["reason"].startswith(reason), row


def test_a_bf16_layout_may_differ_from_one_process_by_twice_the_measured_bf16_fp32_gap():
    mr = _multi_rank()
    assert mr.tolerance("fp32", 0.01) == mr.LAYOUT_TOL == 1e-5  # the CPU tests' tolerance
    assert mr.tolerance("bf16", 0.01) == pytest.approx(1e-5 + 0.02) and mr.tolerance("bf16", None) is None
    reference = {"te-bf16": {"losses": [5.0, 4.0, 3.0, 2.0]}}
    ran = {"backend": "te", "dtype": "bf16", "optimizer": "megatron-distributed", "resumed_from_step": 2}
    close = mr.compare("dp2", {**ran, "losses": [5.0, 4.01, 3.0, 2.0]}, reference, {"te": 0.005}, 4)
    assert close["status"] == "pass" and close["max_abs_diff"] == pytest.approx(0.01)
    assert mr.compare("dp2", {**ran, "losses": [5.0, 4.02, 3.0, 2.0]}, reference, {"te": 0.005}, 4)["status"] == "fail"
    not_resumed = mr.compare("dp2", {**ran, "resumed_from_step": None, "losses": [5.0, 4.0, 3.0, 2.0]}, reference,
                             {"te": 0.005}, 4)
    assert not_resumed["status"] == "fail" and "stopped and resumed: False" in not_resumed["reason"]
    assert mr.compare("dp2", None, reference, {}, 4)["status"] == "error"  # the ranks never got to it
    environment = mr.rank_environment(1)
    assert environment["NCCL_HOSTID"] != mr.rank_environment(0)["NCCL_HOSTID"]
    assert (environment["NCCL_SOCKET_IFNAME"], environment["GLOO_SOCKET_IFNAME"]) == ("lo", "lo")


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

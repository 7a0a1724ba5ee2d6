"""Fault drills: what a failure does to a run, and that running the same command again loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "torchrun.sh"
STEPS = 24
KILL_AFTER = 6  # logged steps before the kill: the checkpoint of step 4 exists by then


def _torchrun(tmp_path: Path, toy_data: Path, name: str) -> tuple[list[str], dict, Path]:
    """launch/torchrun.sh with 2 CPU ranks and a short toy run into tmp_path/name."""
    ckpt = tmp_path / name
    cmd = [str(LAUNCHER), "2", str(REPO / "examples" / "toy_cpu.yaml"), f"data.prepare_dir={toy_data}",
           f"checkpoint.dir={ckpt}", f"train.steps={STEPS}", "train.global_batch=4", "train.micro_batch=2",
           "train.warmup_steps=2", "checkpoint.every=4", "log.tensorboard=false", "--no-progress"]
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return cmd, env, ckpt


def _steps(ckpt: Path) -> list[int]:
    path = ckpt / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _final_loss(ckpt: Path) -> float:
    return json.loads((ckpt / "metrics.jsonl").read_text().splitlines()[-1])["loss"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from megarope import data

    out = tmp_path_factory.mktemp("toy-data")
    data.prepare_toy_data(out)
    return out


@pytest.mark.slow
def test_a_rank_killed_mid_step_fails_the_run_and_a_rerun_resumes_exactly(tmp_path, toy_data):
    cmd, env, reference = _torchrun(tmp_path, toy_data, "reference")
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True, timeout=600)

    cmd, env, ckpt = _torchrun(tmp_path, toy_data, "killed")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while len(_steps(ckpt)) < KILL_AFTER:
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "killed.log").read_text()
                time.sleep(0.1)
            ranks = {int(p.environ()["LOCAL_RANK"]): p for p in psutil.Process(proc.pid).children()
                     if "LOCAL_RANK" in p.environ()}
            ranks[1].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            status = proc.wait(timeout=120)  # no hang: the other rank and torchrun end on their own
        finally:
            proc.kill()
    assert status != 0
    assert time.monotonic() - killed_at < 120
    latest = (ckpt / "latest").read_text().strip()
    assert latest in {f"step_{s:07d}" for s in range(4, STEPS, 4)}  # a periodic checkpoint, complete

    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert f"resuming from {ckpt / latest}" in rerun.stdout
    assert _steps(ckpt) == list(range(1, STEPS + 1))  # each step once: lines after the checkpoint were dropped
    assert _final_loss(ckpt) == _final_loss(reference)
    assert not [name for name in os.listdir(ckpt) if name.endswith(".partial")]  # a save the kill cut short is gone

"""Fault drills: what a failure does to a run, and that running the same command again loses nothing.

Each drill checks what the user sees (one line, the exit status) and that no completed checkpoint
and no metrics line is lost. The README's reliability table names these tests.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from megarope import checkpoint, config, data, train
from megarope.cli import main
from megarope.errors import UsageError
from distributed import run_distributed

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


# ----------------------------------------------------------------------------------------------- a small run
# Shared by the drills below: the toy preset at seq_len 64, 4 sequences per step, 6 steps, a checkpoint
# every 2 (keep 2), on a small byte-level corpus; on the CPU path (gloo ranks, torch AdamW).
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU training drills (gloo ranks)")
SMALL_STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A ~0.5 MB byte-level indexed dataset from 40 stdlib files (its prefix); docs.jsonl beside it."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    with open(root / "docs.jsonl", "w") as f:
        for name in sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:40]:
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as src:
                f.write(json.dumps({"text": src.read()}) + "\n")
    return data.preprocess([str(root / "docs.jsonl")], "bytes", str(root / "train"))["prefix"]


def small_raw(corpus: str, run, *overrides: str) -> dict:
    raw = {"model": {"preset": "toy"},
           "train": {"steps": SMALL_STEPS, "seq_len": 64, "global_batch": 4, "micro_batch": 2, "lr": 1e-3,
                     "warmup_steps": 1, "seed": 7},
           "data": {"path": corpus, "tokenizer": "bytes"},
           "checkpoint": {"dir": str(run), "every": 2, "keep": 2},
           "log": {"tensorboard": False}}
    return config.apply_overrides(raw, list(overrides))


def small_cfg(corpus: str, run, *overrides: str) -> config.Config:
    return config.validate(small_raw(corpus, run, *overrides))


def small_yaml(corpus: str, run, path, *overrides: str) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(small_raw(corpus, run, *overrides), f)
    return str(path)


def metric_lines(run) -> list[str]:
    path = Path(run) / train.METRICS
    return path.read_text().splitlines() if path.exists() else []


def metric_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in metric_lines(run)]


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in metric_lines(run)]


def pointer(run) -> str:
    return (Path(run) / checkpoint.LATEST).read_text().strip()


def snapshot(run) -> dict:
    """Everything a drill must not lose or change: each file's bytes (but the lock's holder line)."""
    run = Path(run)
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != checkpoint.LOCK}


def assert_kept(run, before: dict) -> None:
    """Nothing of ``before`` is lost or changed: no checkpoint file, no metrics line."""
    after = snapshot(run)
    for name, content in before.items():
        assert after.get(name) == content, f"{name} was lost or changed"


def assert_resumed(run, before: dict, resumed_at: int, steps: int = SMALL_STEPS) -> None:
    """A rerun that resumed from step ``resumed_at`` kept every metrics line up to that step word for
    word and wrote each later step once; every checkpoint now in the directory is intact and `latest`
    names the newest, when the rerun saved one (older ones go as checkpoint.keep says)."""
    kept = [line for line in before[train.METRICS].decode().splitlines() if json.loads(line)["step"] <= resumed_at]
    assert metric_lines(run)[:len(kept)] == kept
    assert metric_steps(run) == list(range(1, steps + 1))
    found = checkpoint.training_checkpoints(str(run))
    assert all(checkpoint.verify_checkpoint(path) is None for _, path in found)
    if resumed_at < steps:
        assert pointer(run) == os.path.basename(found[-1][1])


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory) -> dict:
    """One uninterrupted run (step_0000004 and step_0000006 kept): its directory and per-step losses."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train.run(small_cfg(corpus, run), progress=False)
    from megarope import parallel

    parallel.destroy()
    return {"dir": run, "losses": losses(run)}


def copy_run(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished["dir"], run)
    return run


# ----------------------------------------------------------------------------------------------- damaged checkpoints
def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_a_byte(path: Path) -> None:
    """Change one byte in the middle: the size stays, only a checksum can tell."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _garble(path: Path) -> None:
    path.write_text("{not json")


DAMAGE = {  # id: (what is done to which file of run/, the words of the one line, the checkpoint a fallback takes)
    "model-shard-truncated": (_truncate, "step_0000006/model/__0_0.distcp is corrupt: 1,708,634 bytes, 3,417,268", 4),
    "model-metadata-changed": (_flip_a_byte, "step_0000006/model/.metadata is corrupt: its contents changed", 4),
    "optimizer-shard-changed": (_flip_a_byte, "step_0000006/optimizer/__0_0.distcp is corrupt: its contents changed", 4),
    "optimizer-metadata-truncated": (_truncate, "step_0000006/optimizer/.metadata is corrupt", 4),
    "rank-file-truncated": (_truncate, "step_0000006/rank/rank_00000.json is corrupt", 4),
    "megarope-json-garbled": (_garble, "step_0000006/megarope.json is corrupt", 4),
    "train-state-truncated": (_truncate, "step_0000006/train_state.json is corrupt", 4),
    "manifest-garbled": (_garble, "step_0000006/manifest.json is corrupt: not readable as JSON", 4),
    "manifest-deleted": (Path.unlink, "step_0000006/manifest.json is missing (its megarope.json says the save wrote one)", 4),
    "shard-deleted": (Path.unlink, "step_0000006/optimizer/__0_0.distcp is missing", 4),
    "latest-garbled": (_garble, "latest names '{not json', which is not a complete checkpoint", 6),
    "latest-names-a-deleted-step": (shutil.rmtree, "latest names 'step_0000006', which is not a complete checkpoint "
                                                   "(no such directory)", 4),
}
DAMAGED_FILE = {"model-shard-truncated": "step_0000006/model/__0_0.distcp",
                "model-metadata-changed": "step_0000006/model/.metadata",
                "optimizer-shard-changed": "step_0000006/optimizer/__0_0.distcp",
                "optimizer-metadata-truncated": "step_0000006/optimizer/.metadata",
                "rank-file-truncated": "step_0000006/rank/rank_00000.json",
                "megarope-json-garbled": "step_0000006/megarope.json",
                "train-state-truncated": "step_0000006/train_state.json",
                "manifest-garbled": "step_0000006/manifest.json", "manifest-deleted": "step_0000006/manifest.json",
                "shard-deleted": "step_0000006/optimizer/__0_0.distcp", "latest-garbled": "latest",
                "latest-names-a-deleted-step": "step_0000006"}


def _damage(run: Path, case: str) -> None:
    harm, _, _ = DAMAGE[case]
    harm(run / DAMAGED_FILE[case])


@cpu_only
@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_stops_the_resume_in_one_line_naming_the_file(corpus, finished, tmp_path, capsys, case):
    """The default (checkpoint.on_corrupt: error): exit 2 with one line naming the damaged file, before
    anything in checkpoint.dir is read past the check or written."""
    run = copy_run(finished, tmp_path)
    _damage(run, case)
    before = snapshot(run)
    path = small_yaml(corpus, run, tmp_path / "c.yaml", "train.steps=8")
    assert main(["train", path, "--no-progress"]) == 2
    err = one_line(capsys.readouterr().err)
    assert str(run / DAMAGE[case][1]) in err, err
    assert "checkpoint.on_corrupt=previous" in err
    assert_kept(run, before)


@cpu_only
@pytest.mark.parametrize("case", ["model-shard-truncated", "optimizer-shard-changed", "rank-file-truncated",
                                  "megarope-json-garbled", "manifest-deleted", "latest-garbled",
                                  "latest-names-a-deleted-step"])
def test_on_corrupt_previous_says_what_it_skipped_and_resumes_exactly_from_the_one_before(
        corpus, finished, tmp_path, capsys, case):
    run = copy_run(finished, tmp_path)
    _damage(run, case)
    before = snapshot(run)
    resumed_at = DAMAGE[case][2]
    summary = train.run(small_cfg(corpus, run, "checkpoint.on_corrupt=previous"), progress=False)
    out = capsys.readouterr().out
    assert f"checkpoint.on_corrupt=previous: skipped {run / DAMAGE[case][1]}" in out, out
    assert f"resuming from {run / f'step_{resumed_at:07d}'} (step {resumed_at})" in out
    assert summary["step"] == SMALL_STEPS
    assert losses(run) == finished["losses"]  # exactly the uninterrupted run
    assert checkpoint.verify_checkpoint(str(run / "step_0000006")) is None  # the damaged one was saved again
    assert_resumed(run, before, resumed_at)


@cpu_only
def test_on_corrupt_previous_with_no_intact_checkpoint_refuses_rather_than_start_over(corpus, finished, tmp_path,
                                                                                     capsys):
    run = copy_run(finished, tmp_path)
    _truncate(run / "step_0000006" / "model" / "__0_0.distcp")
    _flip_a_byte(run / "step_0000004" / "optimizer" / "__0_0.distcp")
    before = snapshot(run)
    path = small_yaml(corpus, run, tmp_path / "c.yaml", "checkpoint.on_corrupt=previous")
    assert main(["train", path]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"no intact checkpoint to resume from in {run}" in err
    assert "step_0000006/model/__0_0.distcp is corrupt" in err and "step_0000004/optimizer/__0_0.distcp" in err
    assert_kept(run, before)


@cpu_only
def test_a_checkpoint_without_a_manifest_that_fails_to_load_is_one_line(corpus, finished, tmp_path, capsys):
    """A checkpoint saved before manifests has its JSON checked only; a damaged shard then fails in
    dist_checkpointing's load, and that error is one line naming the part that failed."""
    run = copy_run(finished, tmp_path)
    step = run / "step_0000006"
    (step / checkpoint.MANIFEST).unlink()
    meta = json.loads((step / checkpoint.META).read_text())
    del meta["manifest"]
    (step / checkpoint.META).write_text(json.dumps(meta))
    assert checkpoint.verify_checkpoint(str(step)) is None  # nothing to check it against
    _truncate(step / "model" / "__0_0.distcp")
    before = snapshot(run)
    path = small_yaml(corpus, run, tmp_path / "c.yaml", "train.steps=8")
    assert main(["train", path]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"cannot load {step / 'model'}: " in err, err
    assert_kept(run, before)


@cpu_only
def test_a_damaged_init_from_checkpoint_is_one_line_naming_the_file(corpus, finished, tmp_path, capsys):
    source = copy_run(finished, tmp_path) / "step_0000006"
    _flip_a_byte(source / "model" / "__0_0.distcp")
    path = small_yaml(corpus, tmp_path / "tuned", tmp_path / "c.yaml", f"init.from={source}")
    assert main(["train", path]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"init.from: {source / 'model' / '__0_0.distcp'} is corrupt: its contents changed" in err, err
    assert not metric_lines(tmp_path / "tuned")


# ----------------------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: room for one checkpoint of the small run (10 MB), not two."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the simulated drill below runs everywhere)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the simulated drill below runs everywhere")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@cpu_only
def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(corpus, finished, small_disk,
                                                                                   tmp_path, capsys):
    """A real full disk: step 2's checkpoint fits the tmpfs, step 4's does not (its optimizer shard
    runs out of space). The run stops with exit 2 and one line; `latest` still names step 2, which
    verifies; nothing partial is left; metrics.jsonl has steps 1-4. With room again (the tmpfs grown),
    the same command resumes from step 2 and ends exactly as the uninterrupted run."""
    run = small_disk / "run"
    path = small_yaml(corpus, run, tmp_path / "c.yaml")
    assert main(["train", path, "--no-progress"]) == 2
    err = one_line(capsys.readouterr().err)
    assert (f"cannot save {run / 'step_0000004'}: no space left on device in {run}; the run stopped after step 4 "
            f"and a rerun resumes from {run / 'step_0000002'}") in err, err
    assert pointer(run) == "step_0000002"
    assert checkpoint.training_checkpoints(str(run)) == [(2, str(run / "step_0000002"))]
    assert checkpoint.verify_checkpoint(str(run / "step_0000002")) is None
    assert not [name for name in os.listdir(run) if "partial" in name]
    assert metric_steps(run) == [1, 2, 3, 4]
    before = snapshot(run)

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(["train", path, "--no-progress"]) == 0
    assert "resuming from " + str(run / "step_0000002") in capsys.readouterr().out
    assert losses(run) == finished["losses"]
    assert_resumed(run, before, resumed_at=2)


def _out_of_space_on_rank_1(corpus: str, run: str) -> str:
    """On each of 2 ranks: train, with rank 1's write of its step-4 RNG file failing as a full disk does."""
    from megarope import parallel

    real_save = checkpoint.write_json_atomic

    def save(path, obj):
        if ".step_0000004.partial" in str(path) and str(path).endswith("rank_00001.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(path, obj)

    checkpoint.write_json_atomic = save
    try:
        train.run(small_cfg(corpus, run), progress=False)
    except UsageError as e:
        return str(e)
    finally:
        checkpoint.write_json_atomic = real_save
        parallel.destroy()
    return "no error"


@cpu_only
@pytest.mark.slow
def test_a_save_that_fails_on_one_rank_stops_every_rank_and_keeps_the_previous_checkpoint(corpus, tmp_path):
    """Simulated, and why: a tmpfs fills for every rank at once, so to show that a write failing on
    ONE rank (a node's own disk, its quota) stops all of them at the same save, with nobody left
    waiting in a collective, rank 1's write of its RNG file raises OSError(ENOSPC) as the file system would."""
    run = tmp_path / "run"
    rank0, rank1 = run_distributed(_out_of_space_on_rank_1, 2, corpus, str(run), timeout=300)
    kept = f"the run stopped after step 4 and a rerun resumes from {run / 'step_0000002'}"
    assert rank1.startswith(f"cannot save {run / 'step_0000004'}: no space left on device in {run}") and kept in rank1
    assert rank0.startswith(f"cannot save {run / 'step_0000004'}: another rank stopped") and kept in rank0
    assert "\n" not in rank0 + rank1
    assert pointer(run) == "step_0000002" and checkpoint.verify_checkpoint(str(run / "step_0000002")) is None
    assert not [name for name in os.listdir(run) if "partial" in name]
    assert metric_steps(run) == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------- two runs, one directory
@cpu_only
@pytest.mark.slow
def test_a_second_run_on_the_same_checkpoint_dir_is_refused_and_a_killed_run_leaves_no_stale_lock(
        corpus, tmp_path, capsys):
    """Run A trains; run B on the same checkpoint.dir exits 2 with one line naming A, and changes
    nothing of A's (no checkpoint, no metrics line, not its save in progress). Killed with SIGKILL,
    A holds nothing more: the kernel dropped its lock, and B resumes from A's checkpoint."""
    run = tmp_path / "run"
    long_run = small_yaml(corpus, run, tmp_path / "a.yaml", "train.steps=400")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(tmp_path / "a.log", "w") as log:
        a = subprocess.Popen([sys.executable, "-m", "megarope", "train", long_run, "--no-progress"], env=env,
                             cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(metric_steps(run)) < 5:  # step 4's checkpoint is saved before step 5's line
            assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.1)
        # A holds still while B tries, so that the two snapshots compare: all of it, the process that writes a
        # save in progress included (A leads its own process group)
        os.killpg(a.pid, signal.SIGSTOP)
        before = snapshot(run)
        assert main(["train", long_run, "--no-progress"]) == 2
        err = one_line(capsys.readouterr().err)
        assert f"{run} is in use by another run (pid {a.pid} on " in err and "another checkpoint.dir" in err, err
        assert_kept(run, before)
        os.killpg(a.pid, signal.SIGCONT)
        time.sleep(0.5)
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    assert a.returncode == -signal.SIGKILL
    before = snapshot(run)
    latest = int(pointer(run)[5:])
    assert main(["train", long_run, f"train.exit_at_step={latest + 1}", "--no-progress"]) == 0
    assert f"resuming from {run / f'step_{latest:07d}'}" in capsys.readouterr().out
    assert_resumed(run, before, resumed_at=latest, steps=latest + 1)


def _train_and_report(corpus: str, run: str) -> str:
    from megarope import parallel

    try:
        train.run(small_cfg(corpus, run), progress=False)
    except UsageError as e:
        return str(e)
    finally:
        parallel.destroy()
    return "trained"


@cpu_only
@pytest.mark.slow
def test_the_lock_refusal_reaches_every_rank(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / checkpoint.LOCK, "a+") as held:  # another run holds it (this test process)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rank0, rank1 = run_distributed(_train_and_report, 2, corpus, str(run), timeout=300)
    assert f"{run} is in use by another run" in rank0
    assert rank1 == "another rank stopped on bad input (see its message)"
    assert sorted(os.listdir(run)) == [checkpoint.LOCK]  # nothing written


# ----------------------------------------------------------------------------------------------- the data changed
def _reordered_copy(corpus: str, out: Path) -> str:
    """The corpus with its first two documents swapped: the same tokens, so the same .bin size, but
    other document lengths in order, so another .idx."""
    docs = Path(corpus).with_name("docs.jsonl").read_text().splitlines()
    assert len(docs[0]) != len(docs[1])
    (out / "docs.jsonl").write_text("\n".join([docs[1], docs[0], *docs[2:]]) + "\n")
    return data.preprocess([str(out / "docs.jsonl")], "bytes", str(out / "train"))["prefix"]


@cpu_only
@pytest.mark.parametrize("change, words", [
    ("append", ".bin is 2,289,932 bytes, 2,289,732 then"),
    ("reorder", ".idx differs (documents added, removed, reordered or tokenized differently)"),
])
def test_data_changed_under_a_run_is_refused_on_resume(corpus, tmp_path, capsys, change, words):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus + suffix, data_dir / ("train" + suffix))
    prefix, run = str(data_dir / "train"), tmp_path / "run"
    path = small_yaml(prefix, run, tmp_path / "c.yaml")
    assert main(["train", path, "train.exit_at_step=2", "--no-progress"]) == 0
    recorded = checkpoint.read_train_state(str(run / "step_0000002"))["data"]
    assert recorded == data.fingerprint([(prefix, 1.0)]) and recorded[0]["prefix"] == prefix
    if change == "append":
        with open(prefix + ".bin", "ab") as f:
            f.write(bytes(200))
    else:
        other = tmp_path / "other"
        other.mkdir()
        for suffix in (".bin", ".idx"):
            shutil.copy(_reordered_copy(corpus, other) + suffix, prefix + suffix)
    capsys.readouterr()
    before = snapshot(run)
    assert main(["train", path, "--no-progress"]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"the training data changed since {run / 'step_0000002'} was saved: {prefix}{words}" in err, err
    assert "init.from=" in err
    assert_kept(run, before)


@cpu_only
def test_the_same_data_moved_elsewhere_resumes(corpus, finished, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus + suffix, moved / ("train" + suffix))
    run = tmp_path / "run"
    train.run(small_cfg(corpus, run, "train.exit_at_step=2"), progress=False)
    before = snapshot(run)
    train.run(small_cfg(str(moved / "train"), run), progress=False)
    assert losses(run) == finished["losses"]
    assert_resumed(run, before, resumed_at=2)

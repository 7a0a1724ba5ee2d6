"""The demo: its stage bookkeeping, a seconds-scale run of the whole pipeline, and stopping it with
SIGTERM or SIGINT (the real demo is `make demo`, not a test)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eval_helpers import count_scoring_calls
from megarope import config as configuration, demo
from megarope.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
TINY = demo.Budget(pretrain_steps=6, tune_steps=3, eval_docs=2, eval_len=1024)


def test_predicted_bounds_for_the_toy_model():
    assert demo.predicted_bound(1e6) == pytest.approx(1117, abs=1)  # above beta_0: eq. (16b)
    assert demo.predicted_bound(1e4) == 128  # at most beta_0: the tuning length
    assert demo.predicted_bound(10.0) is None  # below beta_3 = 20.4: no hard bound


# ----------------------------------------------------------------------------------------------- stages
def _fake_checkpoint(cfg: dict, step: int) -> str:
    """A step directory as train writes it, as far as the demo reads it (megarope.json, train_state.json)."""
    root = cfg["checkpoint"]["dir"]
    path = os.path.join(root, f"step_{step:07d}")
    os.makedirs(path)
    write_json_atomic(os.path.join(path, "megarope.json"), {})
    write_json_atomic(os.path.join(path, "train_state.json"),
                      {"step": step, "config": configuration.validate(cfg).to_dict()})
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(os.path.basename(path) + "\n")
    return path


@pytest.fixture
def trained(monkeypatch):
    """train.run replaced by a record of the configs it was given; it reports a finished run."""
    from megarope import train

    calls = []

    def fake_run(cfg, progress=None):
        calls.append(cfg)
        root = cfg["checkpoint"]["dir"]
        return {"step": cfg["train"]["steps"], "loss": 1.0, "stopped": None,
                "checkpoint": os.path.join(root, f"step_{cfg['train']['steps']:07d}")}

    monkeypatch.setattr(train, "run", fake_run)
    return calls


def _base_config(tmp_path, init_from, steps=3):
    return demo._train_config(str(tmp_path), "base-10", 10.0, steps, 1e-3, str(tmp_path / "data" / "train"),
                              init_from)


def test_a_finished_stage_is_reused(tmp_path, trained, capsys):
    cfg = _base_config(tmp_path, str(tmp_path / "pretrain" / "step_0000006"))
    done = _fake_checkpoint(cfg, 3)
    assert demo._stage("base-10", cfg, demo._StopSignals()) == done
    assert trained == [] and "cached" in capsys.readouterr().out


def test_a_stopped_stage_is_resumed(tmp_path, trained, capsys):
    cfg = _base_config(tmp_path, str(tmp_path / "pretrain" / "step_0000006"))
    _fake_checkpoint(cfg, 2)
    demo._stage("base-10", cfg, demo._StopSignals())
    assert trained == [cfg] and "resuming at step 2 of 3" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(cfg["checkpoint"]["dir"], "step_0000002"))  # left for train to resume


@pytest.mark.parametrize("change", ["another pretraining checkpoint", "other settings"])
def test_a_stage_trained_from_elsewhere_starts_over(tmp_path, trained, capsys, change):
    """What an interrupted pretraining once left behind: a finished stage continued from a half-pretrained
    checkpoint. It is never reused, however finished."""
    pretrained = str(tmp_path / "pretrain" / "step_0000006")
    new = _base_config(tmp_path, pretrained)
    if change == "other settings":
        old, new = new, _base_config(tmp_path, pretrained, steps=4)
    else:
        old = _base_config(tmp_path, str(tmp_path / "pretrain" / "step_0000002"))
    _fake_checkpoint(old, 3)
    demo._stage("base-10", new, demo._StopSignals())
    assert trained == [new] and "starting over" in capsys.readouterr().out
    assert not os.path.exists(new["checkpoint"]["dir"])  # the fake train wrote nothing; the old stage is gone


# ----------------------------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def stdlib_data(tmp_path_factory):
    """The demo's data directory, prepared once for this module (each run links it as OUT/data)."""
    from megarope import data

    path = tmp_path_factory.mktemp("demo-data")
    data.prepare_toy_data(path)
    return path


def _out(tmp_path, stdlib_data) -> Path:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "data").symlink_to(stdlib_data)
    return out


def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def _wait_for_steps(metrics: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_steps(metrics)) < n:
        assert time.monotonic() < deadline, f"no {n} steps in {metrics} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, stdlib_data, capsys, monkeypatch):
    out = _out(tmp_path, stdlib_data)
    summary = demo.run(str(out), budget=TINY)
    assert [s["base"] for s in summary] == list(demo.BASES)
    assert {tuple(sorted(s)) for s in summary} == {("base", "measured_break", "predicted_bound")}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 12 and all({"run", "length", "loss", "ppl", "accuracy", "n_docs"} <= set(r) for r in records)
    assert [r["length"] for r in records] == [128, 256, 512, 1024] * 3 and all(r["n_docs"] == 2 for r in records)
    assert os.path.getsize(out / "ppl_vs_length.png") > 1000
    printed = capsys.readouterr().out
    assert "predicted bound" in printed and "measured break" in printed

    demo.run(str(out), budget=TINY)  # a rerun trains nothing
    assert capsys.readouterr().out.count("cached") == 4

    # SIGINT during the evaluation (in the second model): it stops before its next batch, and the demo with it
    batches = count_scoring_calls(monkeypatch, signal_at=2)
    with pytest.raises(demo.Interrupted, match=r"stopped by SIGINT in stage eval") as e:
        demo.run(str(out), budget=TINY)
    assert e.value.signum == signal.SIGINT and len(batches) == 2  # one batch per model: the third never started
    assert len(json.loads((out / "results.json").read_text())) == 8
    assert json.loads((out / "unfinished.json").read_text())["stopped"] == "SIGINT"


@pytest.mark.slow
def test_sigint_during_a_stage_saves_it_and_stops_the_demo(tmp_path, stdlib_data):
    """Ctrl-C: the training stage saves at the end of its step (train handles SIGTERM, to which the demo
    passes SIGINT on), then the whole demo stops instead of going on to the next stage."""
    out = _out(tmp_path, stdlib_data)
    metrics = out / "pretrain" / "metrics.jsonl"

    def interrupt():
        _wait_for_steps(metrics, 2)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(demo.Interrupted, match=r"stopped by SIGINT in stage pretrain after step (\d+) of 400") as e:
        demo.run(str(out), budget=demo.Budget(pretrain_steps=400, tune_steps=3, eval_docs=2, eval_len=512))
    assert e.value.signum == signal.SIGINT
    stopped_at = _steps(metrics)[-1]
    assert (out / "pretrain" / "latest").read_text().strip() == f"step_{stopped_at:07d}"  # saved where it stopped
    assert not any(out.glob("base-*"))
    assert signal.getsignal(signal.SIGINT) is before  # the demo's handlers are gone


CHILD = """
import sys
from megarope import cli, demo
demo.QUICK = demo.Budget(pretrain_steps=60, tune_steps=3, eval_docs=2, eval_len=512)
sys.exit(cli.main(["demo", "--out", sys.argv[1], "--quick"]))
"""


@pytest.mark.slow
def test_sigterm_mid_pretraining_stops_the_demo_and_a_rerun_resumes(tmp_path, stdlib_data):
    out = _out(tmp_path, stdlib_data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    metrics = out / "quick" / "pretrain" / "metrics.jsonl"
    with open(tmp_path / "first.out", "w") as log, open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], env=env, stdout=log, stderr=err)
        try:
            _wait_for_steps(metrics, 2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        finally:
            proc.kill()
    said = [line for line in (tmp_path / "first.err").read_text().splitlines() if line.startswith("megarope")]
    stopped_at = _steps(metrics)[-1]
    assert said == [f"megarope demo: stopped by SIGTERM in stage pretrain after step {stopped_at} of 60 (saved "
                    f"{out}/quick/pretrain/step_{stopped_at:07d}); run it again to resume"]
    assert not any((out / "quick").glob("base-*"))  # nothing continued from the half-pretrained model

    rerun = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"[pretrain] resuming at step {stopped_at} of 60" in rerun.stdout
    assert _steps(metrics) == list(range(1, 61))  # each step once
    assert (out / "quick" / "summary.json").exists()
    # a log file gets the periodic lines, never a progress bar
    assert "step 60/60" in rerun.stdout and "\r" not in rerun.stdout + rerun.stderr

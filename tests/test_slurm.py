"""launch/slurm.sbatch, unmodified, on a real Slurm cluster: launch/local_slurm.sh starts one on this
machine (munge, slurmctld, two slurmd), and the toy example trains on it, is signalled, preempted,
cancelled, requeued and resumed the ways a real cluster does it; `slurm.sbatch eval ...` evaluates a
toy checkpoint with CP across the two nodes, through a time-limit warning and a requeue; and
`slurm.sbatch experiment ...` runs every stage of an experiment on a tiny HF model with CP across the two
nodes, warned in its training stage, requeued and resumed there.

Needs Slurm's daemons (Debian: slurmctld slurmd slurm-client munge; .ci/run installs them); without
them every test here skips with one line saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
CLUSTER = REPO / "launch" / "local_slurm.sh"
CONFIG = REPO / "examples" / "toy_cpu.yaml"
STEPS = 24
# A short toy run: 24 steps of 4 sequences, a checkpoint every 4 steps.
SHORT = [f"train.steps={STEPS}", "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=2",
         "checkpoint.every=4", "checkpoint.keep=2", "log.every=4", "log.tensorboard=false", "--no-progress"]
STOP_AFTER = 6  # interrupt once this many steps are logged: a periodic checkpoint (step 4) exists by then
JOB_TIMEOUT = 240

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _why_not_runnable() -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [cmd for cmd in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(cmd, path=path) is None]
    if missing:
        return (f"Slurm is not installed (no {', '.join(missing)}; Debian/Ubuntu: apt-get install slurmctld slurmd "
                f"slurm-client munge, which .ci/run does)")
    return None


@dataclass
class Cluster:
    state: str
    env: dict

    def run(self, *cmd: str, **env: str) -> str:
        return subprocess.run(cmd, env={**self.env, **env}, check=True, capture_output=True, text=True).stdout

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, PreemptTime, ExitCode, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))


@pytest.fixture(scope="module")
def cluster():
    why = _why_not_runnable()
    if why:
        pytest.skip(why)
    state = tempfile.mkdtemp(prefix="megarope-slurm-")  # short: munge's socket path must fit 108 bytes
    env = {**os.environ, "SLURM_CONF": os.path.join(state, "slurm.conf"), "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    started = subprocess.run([str(CLUSTER), "start", state], env=env, capture_output=True, text=True)
    if started.returncode:
        logs = "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(Path(state, "log").glob("*")))
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(f"the local Slurm cluster did not start:\n{started.stdout}{started.stderr}{logs}")
    try:
        yield Cluster(state, env)
    finally:
        subprocess.run([str(CLUSTER), "stop", state], env=env, capture_output=True, text=True)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from megarope import data

    out = tmp_path_factory.mktemp("toy-data")
    data.prepare_toy_data(out)
    return out


@dataclass
class Run:
    """What a job did: Slurm's record, the job's output, and the checkpoint directory's state."""

    job_id: str
    ckpt: Path
    out: Path
    info: dict = field(default_factory=dict)
    at_stop: dict = field(default_factory=dict)  # right after the first start ended: latest and last logged step

    @property
    def output(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def logged_steps(self) -> list[int]:
        path = self.ckpt / "metrics.jsonl"
        return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []

    def final_loss(self) -> float:
        return json.loads((self.ckpt / "metrics.jsonl").read_text().splitlines()[-1])["loss"]

    def latest_step(self) -> int | None:
        pointer = self.ckpt / "latest"
        return int(pointer.read_text().strip().split("_")[-1]) if pointer.exists() else None


def _submit(cluster: Cluster, workdir: Path, toy_data: Path, nodes: int, ranks: int, *sbatch_args: str) -> Run:
    """launch/slurm.sbatch with the toy example: NODES x RANKS CPU ranks (no GPUs in this cluster)."""
    ckpt, out = workdir / "ckpt", workdir / "job.out"
    job_id = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", f"--cpus-per-task={ranks}",
                         f"--chdir={workdir}", f"--output={out}", *sbatch_args, str(SBATCH), str(CONFIG),
                         f"data.prepare_dir={toy_data}", f"checkpoint.dir={ckpt}", *SHORT).strip().split(";")[0]
    return Run(job_id, ckpt, out)


def _wait(what: str, condition, run: Run, timeout: float = JOB_TIMEOUT, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (job {run.job_id}); its output:\n{run.output[-6000:]}")


FINAL = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _finish(cluster: Cluster, run: Run) -> Run:
    run.info = _wait("the job to end", lambda: (info := cluster.job(run.job_id))["JobState"] in FINAL and info, run)
    return run


def _interrupted(cluster: Cluster, run: Run, interrupt) -> Run:
    """Interrupt a job once it has logged STOP_AFTER steps; note what the first start left; wait for the end."""
    _wait(f"{STOP_AFTER} logged steps", lambda: len(run.logged_steps()) >= STOP_AFTER, run)
    interrupt(run)

    def first_start_over():  # requeued (pending again: its processes are gone), or ended
        info = cluster.job(run.job_id)
        return (int(info["Restarts"]) > 0 and info["JobState"] == "PENDING") or info["JobState"] in FINAL

    _wait("the first start to end", first_start_over, run, every=0.1)
    # The requeued start needs over 10 s (requeue delay, then Python and torch) before it touches the directory.
    run.at_stop = {"latest": run.latest_step(), "logged": run.logged_steps()[-1]}
    return _finish(cluster, run)


def _preempt(cluster: Cluster, run: Run) -> None:
    """A job of the high-priority partition that needs every CPU of both nodes."""
    cluster.run("sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive", "--output=/dev/null",
                "--wrap", "sleep 1")


def _assert_ran_to_the_end(run: Run, reference: Run | None = None, restarts: int = 0) -> None:
    assert run.info["JobState"] == "COMPLETED", run.output[-6000:]
    assert int(run.info["Restarts"]) == restarts, run.info
    assert run.logged_steps() == list(range(1, STEPS + 1))  # each step once, in order, across restarts
    assert run.latest_step() == STEPS
    if reference is not None:
        assert run.final_loss() == reference.final_loss()  # the resume was exact


@pytest.fixture(scope="module")
def reference(cluster, toy_data, tmp_path_factory) -> Run:
    """1 node x 2 CPU ranks, uninterrupted."""
    return _finish(cluster, _submit(cluster, tmp_path_factory.mktemp("one-node"), toy_data, 1, 2))


def test_one_node_two_ranks_trains_to_the_end(reference):
    _assert_ran_to_the_end(reference)
    assert "megarope: 1 node x 2 CPU ranks" in reference.output
    assert f"done: step {STEPS}" in reference.output


def test_two_nodes_one_rank_each_trains_to_the_same_result(cluster, toy_data, reference, tmp_path):
    run = _finish(cluster, _submit(cluster, tmp_path, toy_data, 2, 1))
    _assert_ran_to_the_end(run, reference)  # DP=2 either way: the same losses
    assert "megarope: 2 nodes x 1 CPU ranks" in run.output


@pytest.fixture(scope="module")
def time_limit(cluster, toy_data, tmp_path_factory) -> Run:
    """2 nodes x 1 rank; the warning --signal=B:USR1@N sends before the time limit, sent now."""
    run = _submit(cluster, tmp_path_factory.mktemp("time-limit"), toy_data, 2, 1)
    return _interrupted(cluster, run, lambda r: cluster.run("scancel", "--batch", "--signal=USR1", r.job_id))


@pytest.fixture(scope="module")
def preempted_with_grace(cluster, toy_data, tmp_path_factory) -> Run:
    """1 node x 2 ranks in partition main (GraceTime 60 s), preempted by a job of partition high."""
    run = _submit(cluster, tmp_path_factory.mktemp("grace"), toy_data, 1, 2, "--partition=main")
    return _interrupted(cluster, run, lambda r: _preempt(cluster, r))


@pytest.fixture(scope="module")
def preempted_without_grace(cluster, toy_data, tmp_path_factory) -> Run:
    """2 nodes x 1 rank in partition nograce (GraceTime 0), preempted by a job of partition high."""
    run = _submit(cluster, tmp_path_factory.mktemp("nograce"), toy_data, 2, 1, "--partition=nograce")
    return _interrupted(cluster, run, lambda r: _preempt(cluster, r))


@pytest.fixture(scope="module")
def cancelled(cluster, toy_data, tmp_path_factory) -> Run:
    """1 node x 2 ranks, plain scancel."""
    run = _submit(cluster, tmp_path_factory.mktemp("scancel"), toy_data, 1, 2)
    return _interrupted(cluster, run, lambda r: cluster.run("scancel", r.job_id))


def test_time_limit_warning_requeues_and_resumes_exactly(time_limit, reference):
    _assert_ran_to_the_end(time_limit, reference, restarts=1)
    assert "time limit: requeued" in time_limit.output


def test_preemption_with_grace_time_requeues_and_resumes_exactly(preempted_with_grace, reference):
    # Slurm itself ends a job that stops within its GraceTime without requeueing it: the script does.
    _assert_ran_to_the_end(preempted_with_grace, reference, restarts=1)
    assert "preempted: requeued" in preempted_with_grace.output


def test_preemption_without_grace_time_requeues_and_resumes_exactly(preempted_without_grace, reference):
    _assert_ran_to_the_end(preempted_without_grace, reference, restarts=1)


def test_scancel_ends_the_job_without_requeue(cancelled):
    assert cancelled.info["JobState"] == "CANCELLED" and cancelled.info["Restarts"] == "0"
    assert cancelled.logged_steps()[-1] < STEPS
    assert "resuming from" not in cancelled.output  # one start only


@pytest.mark.parametrize("scenario", ["time_limit", "preempted_with_grace", "preempted_without_grace", "cancelled"])
def test_the_ranks_save_at_the_step_they_stop(scenario, request):
    run = request.getfixturevalue(scenario)
    assert run.at_stop["latest"] == run.at_stop["logged"], run.at_stop


# ----------------------------------------------------------------------------------------------- eval
# `megarope eval` of a random toy checkpoint: CP 2 over the two nodes, results written per (run, length).
EVAL_LENGTHS = [512, 1024, 2048, 4096]
EVAL_VARIANTS = ["dynamic-ntk", "as-trained", "base=1e5"]  # dynamic NTK first: its lengths finish one by one


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    from eval_helpers import corpus_texts, save_toy_checkpoint

    root = tmp_path_factory.mktemp("eval-inputs")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus_texts()))
    return save_toy_checkpoint(root / "ckpt"), str(data)


def _submit_eval(cluster: Cluster, workdir: Path, eval_inputs, nodes: int, ranks: int) -> Run:
    """launch/slurm.sbatch in its eval mode, CP 2 over NODES x RANKS CPU ranks; Run.ckpt is --out."""
    from megarope.parallel import free_port

    ckpt, data = eval_inputs
    out, log = workdir / "eval", workdir / "job.out"
    # A free rendezvous port, not the script's job-id one: another local cluster's job of the same id may
    # be running on this machine at the same time (sbatch passes the environment on, requeues included).
    job_id = cluster.run("sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", f"--cpus-per-task={ranks}",
                         f"--chdir={workdir}", f"--output={log}", str(SBATCH), "eval", "--checkpoint", ckpt,
                         "--data", data, "--lengths", ",".join(map(str, EVAL_LENGTHS)),
                         "--variants", ",".join(EVAL_VARIANTS), "--cp", "2", "--out", str(out),
                         RDZV_PORT=str(free_port())).strip().split(";")[0]
    return Run(job_id, out, log)


def _eval_results(run: Run) -> list[dict]:
    path = run.ckpt / "results.json"
    return json.loads(path.read_text()) if path.exists() else []


def _assert_equal_to_one_process(run: Run, reference: list[dict]) -> None:
    assert run.info["JobState"] == "COMPLETED", run.output[-6000:]
    results = _eval_results(run)
    assert [(r["run"], r["length"]) for r in results] == [(r["run"], r["length"]) for r in reference]  # each once
    for got, want in zip(results, reference):
        # fp32, CP's attention merged across ranks: equal to rounding
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["run"]
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5), got["run"]
        assert [b["loss"] for b in got["buckets"]] == pytest.approx([b["loss"] for b in want["buckets"]], rel=1e-5)
        assert (got["n_docs"], got["n_skipped"]) == (want["n_docs"], want["n_skipped"])
        # an argmax can flip on a near-tie of this random model's logits; one in 1000 tokens would show
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-3)
    assert not (run.ckpt / "unfinished.json").exists()  # finished
    assert (run.ckpt / "ppl_vs_length.png").exists()


@dataclass
class EvalJobs:
    whole: Run       # runs through
    warned: Run      # gets the time-limit warning once it has a result, is requeued and resumes
    at_stop: dict    # what --out held when the warned job's first start was over
    reference: list  # the same evaluation in one process: one rank, no CP


@pytest.fixture(scope="module")
def eval_jobs(cluster, eval_inputs, tmp_path_factory) -> EvalJobs:
    """Two evaluations at once, 2 nodes x 1 rank each with CP 2 (each takes one CPU of each node)."""
    from megarope.eval import perplexity

    whole = _submit_eval(cluster, tmp_path_factory.mktemp("eval-whole"), eval_inputs, 2, 1)
    warned = _submit_eval(cluster, tmp_path_factory.mktemp("eval-warned"), eval_inputs, 2, 1)
    _wait("the first result", lambda: _eval_results(warned), warned, every=0.1)
    cluster.run("scancel", "--batch", "--signal=USR1", warned.job_id)

    def first_start_over():
        info = cluster.job(warned.job_id)
        return (int(info["Restarts"]) > 0 and info["JobState"] == "PENDING") or info["JobState"] in FINAL

    _wait("the first start to end", first_start_over, warned, every=0.1)
    # The requeued start needs over 10 s (requeue delay, then Python and torch) before it touches --out.
    at_stop = {"done": len(_eval_results(warned)),
               "unfinished": json.loads((warned.ckpt / "unfinished.json").read_text())}
    ckpt, data = eval_inputs
    reference = perplexity.run([ckpt], [data], EVAL_LENGTHS, EVAL_VARIANTS, verbose=False)
    return EvalJobs(_finish(cluster, whole), _finish(cluster, warned), at_stop, reference)


def test_eval_with_cp_across_two_nodes_equals_one_process(eval_jobs):
    run = eval_jobs.whole
    assert int(run.info["Restarts"]) == 0
    _assert_equal_to_one_process(run, eval_jobs.reference)
    assert "megarope: 2 nodes x 1 CPU ranks" in run.output


def test_eval_time_limit_warning_stops_requeues_and_resumes_at_the_next_unscored_length(eval_jobs):
    run, total, done = eval_jobs.warned, len(EVAL_LENGTHS) * len(EVAL_VARIANTS), eval_jobs.at_stop["done"]
    assert eval_jobs.at_stop["unfinished"]["stopped"] == "SIGUSR1"  # every rank stopped cleanly, before a batch
    assert 1 <= done < total, done  # stopped part-way, not from scratch and not at the end
    assert int(run.info["Restarts"]) == 1 and "time limit: requeued" in run.output
    assert f"resuming: {done} of {total} (run, length) results are in {run.ckpt}/results.json" in run.output
    _assert_equal_to_one_process(run, eval_jobs.reference)


# ----------------------------------------------------------------------------------------------- experiment
# `megarope experiment` of a tiny random HF llama: CP 2 over the two nodes, one base, warned in its training stage.
EXPERIMENT_STEPS = 40


@pytest.fixture(scope="module")
def experiment_config(tmp_path_factory) -> Path:
    """The experiment's config, with its data tokenized by the model's own tokenizer (no built-in corpus)."""
    import yaml
    from eval_helpers import corpus_texts
    from hf_models import random_hf

    from megarope import data

    root = tmp_path_factory.mktemp("experiment-inputs")
    random_hf(root / "model", "llama")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text}) + "\n" for text in corpus_texts()[:3]))
    prefix = data.preprocess([docs], str(root / "model"), str(root / "train"))["prefix"]
    cfg = {"model": {"source": str(root / "model"),
                     "lineage": {"pretrain_base": 1e4, "pretrain_len": 64, "tune_len": 128}},
           "tune": {"bases": [500.0], "seq_len": 128, "steps": EXPERIMENT_STEPS, "global_batch": 2, "micro_batch": 2,
                    "lr": 1e-4, "min_lr": 0.0, "warmup_steps": 0},
           "parallel": {"cp": 2},
           "data": {"train": prefix, "eval": str(docs)},
           "eval": {"lengths": [256, 512], "docs": 1},
           "checkpoint": {"every": 2},
           "log": {"every": 10}}
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def experiment_job(cluster, experiment_config, tmp_path_factory) -> Run:
    """2 nodes x 1 rank; the time-limit warning once the training stage has saved a checkpoint."""
    from megarope.parallel import free_port

    workdir = tmp_path_factory.mktemp("experiment")
    out, log = workdir / "out", workdir / "job.out"
    job_id = cluster.run("sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1",
                         f"--chdir={workdir}", f"--output={log}", str(SBATCH), "experiment", str(experiment_config),
                         f"out={out}", "--no-progress", RDZV_PORT=str(free_port())).strip().split(";")[0]
    run = Run(job_id, out / "base-500", log)
    _wait("the training stage's first checkpoint", run.latest_step, run, every=0.1)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    def first_start_over():
        info = cluster.job(job_id)
        return (int(info["Restarts"]) > 0 and info["JobState"] == "PENDING") or info["JobState"] in FINAL

    _wait("the first start to end", first_start_over, run, every=0.1)
    run.at_stop = {"latest": run.latest_step(), "logged": run.logged_steps()[-1]}
    return _finish(cluster, run)


def test_an_experiment_warned_in_training_requeues_and_resumes_that_stage(experiment_job):
    run = experiment_job
    assert run.info["JobState"] == "COMPLETED", run.output[-6000:]
    assert int(run.info["Restarts"]) == 1 and "time limit: requeued" in run.output
    stopped = run.at_stop["latest"]
    assert stopped == run.at_stop["logged"] < EXPERIMENT_STEPS, run.at_stop  # saved at the step it stopped
    assert "[model] cached" in run.output
    assert f"[base-500] resuming at step {stopped} of {EXPERIMENT_STEPS}" in run.output
    assert run.logged_steps() == list(range(1, EXPERIMENT_STEPS + 1))  # each step once, across the two starts
    out = run.ckpt.parent
    records = json.loads((out / "results.json").read_text())
    assert [(r["base"], r["variant"], r["length"]) for r in records] == [(500.0, "as-trained", n) for n in (256, 512)]
    assert [s["base"] for s in json.loads((out / "summary.json").read_text())] == [500.0]
    assert (out / "report.md").exists() and "megarope: 2 nodes x 1 CPU ranks" in run.output


def test_a_bad_experiment_config_is_one_line_before_any_rank_starts(cluster, experiment_config, tmp_path):
    job_id = cluster.run("sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
                         f"--chdir={tmp_path}", f"--output={tmp_path / 'job.out'}", str(SBATCH), "experiment",
                         str(experiment_config), "tune.bases=[500, 500]").strip().split(";")[0]
    run = _finish(cluster, Run(job_id, tmp_path / "runs", tmp_path / "job.out"))
    assert run.info["JobState"] == "FAILED" and run.info["ExitCode"] == "2:0", run.info
    lines = run.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megarope: error:") and "a base is given twice" in lines[0], lines
    assert not (tmp_path / "runs").exists()  # the config's out (runs/experiment): nothing was written

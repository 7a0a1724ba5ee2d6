"""What loading a checkpoint may unpickle (megarope.trust).

A toy run is shared as a checkpoint someone else made: copied, one pickle in it replaced by a pickle that
creates a marker directory when unpickled (its .metadata, a layer's _extra_state or megatron's
common_state ShardedObject, its rank file), and its manifest.json rewritten to match, as whoever crafted
it would. Every entry point (eval, passkey, init.from, convert --from-mcore, and a resume of it copied in
as checkpoint.dir) refuses it in one line, exit 2, and the marker never appears; with the opt-in the
load is torch's own, and the marker appears: that is what the opt-in allows. FP8 delayed scaling's
pickled TE state is decided from megarope.json before anything is read (on a GPU: tests/gpu/test_fp8.py).
"""

import json
import os
import pickle
import shutil

import pytest
import torch
import yaml
from eval_helpers import corpus_texts

from megarope import checkpoint, config, data, parallel, train, trust
from megarope.cli import main
from megarope.errors import UsageError
from megarope.files import sha256_file

pytestmark = [pytest.mark.filterwarnings("ignore:Could not determine rank"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU training (gloo, torch AdamW)")]
KINDS = ("metadata", "extra_state", "common_state", "rank")


class Plant:
    """What a crafted checkpoint holds: unpickling it creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _rewrite_manifest(step: str) -> None:
    """The manifest a save would have written for the files as they are now."""
    files = {}
    for dirpath, _, names in os.walk(step):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), step)
            if rel != checkpoint.MANIFEST:
                path = os.path.join(dirpath, name)
                files[rel] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    with open(os.path.join(step, checkpoint.MANIFEST), "w") as f:
        json.dump({"hash": "sha256", "files": dict(sorted(files.items()))}, f)


def _plant_in_sharded_objects(step: str, kind: str, marker: str) -> None:
    """Save the model part again with a Plant in a layer's _extra_state, or in megatron's common_state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    parallel.init()
    try:
        model = checkpoint.build_from_checkpoint(step, trust=trust.OWN)
        state = model.sharded_state_dict()
        if kind == "extra_state":
            first = next(v for k, v in state.items() if isinstance(v, ShardedObject) and k.endswith("_extra_state"))
            first.data = Plant(marker)
        else:
            state["planted"] = Plant(marker)  # a value that is no tensor: megatron keeps it in common_state
        shutil.rmtree(os.path.join(step, "model"))
        os.makedirs(os.path.join(step, "model"))
        dist_checkpointing.save(state, os.path.join(step, "model"))
    finally:
        parallel.destroy()


def craft(run: str, into: str, kind: str) -> tuple[str, str, str]:
    """(the crafted copy of training run ``run``, its step directory, the marker its Plant creates)."""
    shutil.copytree(run, into)
    step = checkpoint.latest_checkpoint(into)
    marker = os.path.join(os.path.dirname(into), f"ran-{kind}")
    if kind == "metadata":
        with open(os.path.join(step, "model", ".metadata"), "wb") as f:
            pickle.dump(Plant(marker), f)
    elif kind == "rank":  # the rank file as megarope wrote it before JSON: a torch.save pickle
        os.remove(os.path.join(step, "rank", "rank_00000.json"))
        torch.save({"torch": Plant(marker)}, os.path.join(step, "rank", "rank_00000.pt"))
    else:
        _plant_in_sharded_objects(step, kind, marker)
    _rewrite_manifest(step)
    return into, step, marker


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A 2-step toy run, its config (YAML), a document to evaluate on, and one crafted copy per kind."""
    root = tmp_path_factory.mktemp("trust")
    with open(root / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in corpus_texts())
    prefix = data.preprocess([str(root / "docs.jsonl")], "bytes", str(root / "train"))["prefix"]
    raw = {"model": {"preset": "toy"},
           "train": {"steps": 2, "seq_len": 64, "global_batch": 4, "micro_batch": 2, "lr": 1e-3, "warmup_steps": 1},
           "data": {"path": prefix, "tokenizer": "bytes"},
           "checkpoint": {"dir": str(root / "run"), "every": 2, "keep": 1}, "log": {"tensorboard": False}}
    train.run(config.validate(raw), progress=False)
    parallel.destroy()
    with open(root / "train.yaml", "w") as f:
        yaml.safe_dump(raw, f)
    crafted = {kind: craft(str(root / "run"), str(root / f"shared-{kind}"), kind) for kind in KINDS}
    return {"root": root, "run": str(root / "run"), "yaml": str(root / "train.yaml"), "docs": str(root / "docs.jsonl"),
            "crafted": crafted}


def _entry(shared, entry: str, kind: str, out, opt_in: bool = False) -> int:
    """Run one entry point of the CLI on the crafted checkpoint of ``kind``; its exit status."""
    run, step, _ = shared["crafted"][kind]
    flag = ["--trust-checkpoint"] if opt_in else []
    if entry == "eval":
        argv = ["eval", "--checkpoint", step, "--data", shared["docs"], "--lengths", "64", "--max-docs", "1",
                "--out", str(out), *flag]
    elif entry == "passkey":
        argv = ["passkey", "--checkpoint", step, "--lengths", "256", "--depths", "0", "--trials", "1",
                "--out", str(out), *flag]
    elif entry == "convert":
        argv = ["convert", "--from-mcore", step, "--to-hf", str(out), *flag]
    elif entry == "init.from":
        argv = ["train", shared["yaml"], f"checkpoint.dir={out}", f"init.from={step}",
                *(["init.trust=true"] if opt_in else []), "--no-progress"]
    else:  # a resume of the shared run copied in as checkpoint.dir
        shutil.copytree(run, out)
        argv = ["train", shared["yaml"], f"checkpoint.dir={out}", "train.steps=4", "--no-progress"]
    return main(argv)


REFUSED = [("eval", "metadata"), ("eval", "extra_state"), ("eval", "common_state"),
           ("passkey", "metadata"), ("passkey", "extra_state"),
           ("init.from", "metadata"), ("init.from", "extra_state"),
           ("convert", "metadata"), ("convert", "extra_state"),
           ("resume", "metadata"), ("resume", "extra_state"), ("resume", "rank")]


@pytest.mark.parametrize("entry,kind", REFUSED, ids=[f"{e}-{k}" for e, k in REFUSED])
def test_every_entry_point_refuses_a_crafted_checkpoint_in_one_line(shared, tmp_path, capsys, entry, kind):
    marker = shared["crafted"][kind][2]
    assert _entry(shared, entry, kind, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unpickling it can run code" in err, err
    opt_in = {"init.from": "init.trust: true", "resume": "init.from and init.trust: true"}.get(entry, "--trust-checkpoint")
    assert err.endswith(opt_in + ")" if entry == "resume" else opt_in)
    what = {"metadata": "model/.metadata names posix.mkdir", "rank": "beyond tensors and plain data (posix.mkdir)"}
    assert what.get(kind, "beyond tensors and plain data (posix.mkdir)") in err
    assert not os.path.exists(marker)
    assert trust.FORCE_WEIGHTS_ONLY not in os.environ and trust.TE_UNSAFE_PICKLE not in os.environ


@pytest.mark.parametrize("entry", ["eval", "passkey", "init.from", "convert"])
def test_with_the_opt_in_the_load_is_torchs_own(shared, tmp_path, capsys, entry):
    """The crafted _extra_state holds no weight: with the opt-in the command runs to the end, and the
    marker shows that the pickle ran, as the opt-in said it may."""
    marker = shared["crafted"]["extra_state"][2]
    shutil.rmtree(marker, ignore_errors=True)
    assert _entry(shared, entry, "extra_state", tmp_path / "out", opt_in=True) == 0, capsys.readouterr().err
    assert os.path.isdir(marker)
    shutil.rmtree(marker)


def test_the_runs_own_checkpoints_load_as_before(shared, tmp_path):
    """Their metadata is metadata only, their ShardedObjects tensors and plain data: nothing to refuse."""
    step = checkpoint.latest_checkpoint(shared["run"])
    assert [trust.unsafe_metadata(p) for p in trust.metadata_files(step, ("model", "optimizer"))] == [None, None]
    assert main(["convert", "--from-mcore", step, "--to-hf", str(tmp_path / "hf")]) == 0
    assert main(["train", shared["yaml"], f"checkpoint.dir={tmp_path / 'next'}", f"init.from={step}",
                 "--no-progress"]) == 0


def test_a_rank_file_megarope_wrote_before_json_still_loads(shared, tmp_path):
    """rank_R.pt of older checkpoints: read weights-only, numpy's RNG array allowed by name (not by
    megatron's registration, cleared here)."""
    import random

    import numpy as np

    old = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    path = tmp_path / "run" / "step" / "rank" / "rank_00000"
    os.makedirs(path.parent)
    torch.save(old, str(path) + ".pt")
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        got = checkpoint.read_rank_state(str(path), checkpoint.RESUME)
    finally:
        torch.serialization.add_safe_globals(registered)
    assert torch.equal(got["torch"], old["torch"]) and got["python"] == old["python"]
    assert got["numpy"][0] == "MT19937" and np.array_equal(got["numpy"][1], old["numpy"][1])
    assert got["numpy"][2:] == old["numpy"][2:]


# ----------------------------------------------------------------------------------------------- the guard itself
class FakeTELinear(torch.nn.Linear):
    """Stands for a Transformer Engine layer: only the module it comes from matters here."""


FakeTELinear.__module__ = "transformer_engine.pytorch.module.linear"


def _declaring_delayed_scaling(tmp_path, fp8_recipe="delayed") -> str:
    directory = tmp_path / "fp8"
    os.makedirs(directory, exist_ok=True)
    with open(directory / checkpoint.META, "w") as f:
        json.dump({"trained": {"fp8": "e4m3", "fp8_recipe": fp8_recipe}}, f)
    return str(directory)


def _environment_inside(directory, level, modules) -> dict:
    with trust.guarded_load(directory, trust.Trust(level), modules=modules):
        return {name: os.environ.get(name) for name in
                (trust.TE_UNSAFE_PICKLE, trust.FORCE_WEIGHTS_ONLY, trust.FORCE_FULL_UNPICKLE)}


@pytest.mark.parametrize("level,te_layers,expected", [
    ("foreign", False, (None, "1", None)),  # local layers ignore the pickled bytes: nothing to refuse
    ("own", True, ("1", "1", None)),  # the run's own checkpoint: TE may unpickle its delayed-scaling state
    ("user", True, ("1", None, "1")),  # the user opted in: torch's, megatron's and TE's own load
])
def test_what_the_load_may_unpickle_follows_the_trust_and_is_restored_after(tmp_path, monkeypatch, level, te_layers,
                                                                           expected):
    monkeypatch.delenv(trust.TE_UNSAFE_PICKLE, raising=False)
    monkeypatch.setenv(trust.FORCE_FULL_UNPICKLE, "1")  # a user's setting that would clash with forcing weights-only
    modules = [FakeTELinear(2, 2)] if te_layers else [torch.nn.Linear(2, 2)]
    inside = _environment_inside(_declaring_delayed_scaling(tmp_path), level, modules)
    assert tuple(inside.values()) == expected
    assert os.environ.get(trust.TE_UNSAFE_PICKLE) is None and os.environ[trust.FORCE_FULL_UNPICKLE] == "1"
    assert trust.FORCE_WEIGHTS_ONLY not in os.environ


def test_delayed_scaling_state_of_a_foreign_checkpoint_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv(trust.TE_UNSAFE_PICKLE, raising=False)
    directory = _declaring_delayed_scaling(tmp_path)
    with pytest.raises(UsageError) as refused, trust.guarded_load(directory, trust.FOREIGN, modules=[FakeTELinear(2, 2)]):
        pytest.fail("the body runs only once the checkpoint is accepted")
    assert str(refused.value) == (f"{directory} holds FP8 delayed-scaling state that Transformer Engine keeps as a "
                                  f"pickle: unpickling it can run code; load it only if you trust where it came from: "
                                  f"--trust-checkpoint (or {trust.TE_UNSAFE_PICKLE}=1)")
    # the TE variable the user set is their opt-in; a stateless recipe (tensorwise) stores no pickle
    monkeypatch.setenv(trust.TE_UNSAFE_PICKLE, "1")
    assert _environment_inside(directory, "foreign", [FakeTELinear(2, 2)])[trust.TE_UNSAFE_PICKLE] == "1"
    monkeypatch.delenv(trust.TE_UNSAFE_PICKLE)
    assert _environment_inside(_declaring_delayed_scaling(tmp_path, "tensorwise"), "foreign", [FakeTELinear(2, 2)])


def test_a_checkpoint_that_hides_its_delayed_scaling_state_meets_te_and_the_same_one_line(tmp_path):
    """Transformer Engine's own refusal (its variable unset) becomes the refusal naming the opt-in."""
    directory = _declaring_delayed_scaling(tmp_path, "tensorwise")
    te_says = ("Refusing to load pickled Transformer Engine extra state for TERowParallelLinear. Delayed-scaling FP8 "
               "metadata can be stored as a Python pickle, and loading it can execute arbitrary code.")
    with pytest.raises(UsageError) as refused, trust.guarded_load(directory, trust.chosen(False, trust.CONFIG_OPT_IN)):
        raise RuntimeError(te_says)
    assert "FP8 delayed-scaling state" in str(refused.value)
    assert str(refused.value).endswith(f"init.trust: true (or {trust.TE_UNSAFE_PICKLE}=1)")
    with pytest.raises(RuntimeError, match="Refusing"), trust.guarded_load(directory, trust.chosen(True)):
        raise RuntimeError(te_says)  # opted in: whatever fails is the library's own error


def test_chosen_trust():
    assert trust.chosen(False) == trust.FOREIGN and trust.chosen("own").level == "own"
    assert trust.chosen(True, trust.CONFIG_OPT_IN) == trust.Trust("user", "init.trust: true")
    with pytest.raises(ValueError):
        trust.chosen("yes")


def test_convert_from_hf_takes_no_trust_flag(tmp_path, capsys):
    assert main(["convert", "--from-hf", str(tmp_path), "--to", str(tmp_path / "m"), "--trust-checkpoint"]) == 2
    assert "no --trust-checkpoint" in capsys.readouterr().err

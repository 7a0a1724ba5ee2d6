"""Model checkpoints: loads across backends (only `_extra_state` may differ), any other mismatch is
one line (what a load may unpickle: test_trust.py); the
manifest every save writes and what verify_checkpoint finds with it; a save the file system refuses;
the lock that keeps a second run out of a checkpoint.dir."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from distributed import run_distributed

from megarope import checkpoint, parallel, spec, trust
from megarope.errors import UsageError
from megarope.model import build_model, get_preset
from megarope.rope import RopeConfig


class NormWithExtraState(spec.RMSNorm):
    """The local RMSNorm with the `_extra_state` Transformer Engine's norms carry (its FP8 metadata,
    a byte tensor); records what set_extra_state got and whether TE's unpickling was allowed then."""

    loaded: list = []

    def get_extra_state(self):
        return torch.tensor([1, 2, 3], dtype=torch.uint8)

    def set_extra_state(self, state):
        NormWithExtraState.loaded.append((state, os.environ.get(trust.TE_UNSAFE_PICKLE)))


def _model(seed: int, extra_state: bool = False, extra_param: bool = False):
    parallel.seed_everything(seed)
    model = build_model(get_preset("toy"), RopeConfig(), "local")
    norm = model.decoder.final_layernorm
    if extra_state:
        norm.__class__ = NormWithExtraState  # a "te-like" model: one module more with extra state
    if extra_param:
        norm.register_parameter("bias", torch.nn.Parameter(torch.zeros_like(norm.weight)))
    return model


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor) and k in sb)


@pytest.fixture
def world():
    parallel.init()
    NormWithExtraState.loaded.clear()
    yield


def test_a_checkpoint_without_extra_state_loads_into_a_model_with_it(world, tmp_path):
    source = _model(1)
    checkpoint.save_model(source, str(tmp_path / "local"))
    target = _model(2, extra_state=True)
    assert not _same_weights(source, target)
    checkpoint.load_model(target, str(tmp_path / "local"))
    assert _same_weights(source, target)
    assert NormWithExtraState.loaded == []  # nothing to give it


def test_a_checkpoint_with_extra_state_loads_into_a_model_without_it(world, tmp_path):
    source = _model(1, extra_state=True)
    checkpoint.save_model(source, str(tmp_path / "te-like"))
    target = _model(2)
    checkpoint.load_model(target, str(tmp_path / "te-like"))
    assert _same_weights(source, target)
    # and back into a model that has it: the state arrives (a checkpoint that declares no FP8 delayed
    # scaling gets no leave to unpickle it)
    again = _model(3, extra_state=True)
    checkpoint.load_model(again, str(tmp_path / "te-like"))
    assert _same_weights(source, again)
    [(state, allowed)] = NormWithExtraState.loaded
    assert torch.equal(state, torch.tensor([1, 2, 3], dtype=torch.uint8)) and allowed is None


@pytest.mark.parametrize("saved_has_it", [True, False], ids=["only-in-checkpoint", "only-in-model"])
def test_any_other_key_that_one_side_lacks_is_one_line(world, tmp_path, saved_has_it):
    checkpoint.save_model(_model(1, extra_param=saved_has_it), str(tmp_path / "ck"))
    with pytest.raises(UsageError) as error:
        checkpoint.load_model(_model(2, extra_param=not saved_has_it), str(tmp_path / "ck"))
    message = str(error.value)
    assert "\n" not in message and "decoder.final_layernorm.bias" in message
    assert ("not in the model" if saved_has_it else "not in the checkpoint") in message
    assert trust.FORCE_WEIGHTS_ONLY not in os.environ  # a failed load leaves the environment as it was


def _built_without_parallel_state(directory: str) -> dict:
    from megatron.core import parallel_state

    assert not parallel_state.model_parallel_is_initialized()
    model = checkpoint.build_from_checkpoint(directory)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_a_checkpoint_builds_in_a_process_without_parallel_state(world, tmp_path):
    """A fresh process, no parallel.init() first: as evaluation code calls it after training ended its process
    group (the GPU's FP8 reload test did, and megatron said its pipeline group was not initialized)."""
    source = _model(1)
    checkpoint.save_model(source, str(tmp_path / "ck"))
    (built,) = run_distributed(_built_without_parallel_state, 1, str(tmp_path / "ck"))
    expected = {k: v for k, v in source.state_dict().items() if isinstance(v, torch.Tensor)}
    assert built.keys() == expected.keys() and all(torch.equal(built[k], v) for k, v in expected.items())


# ----------------------------------------------------------------------------------------------- manifests
def test_every_save_writes_a_manifest_of_its_files_and_verify_checks_them(world, tmp_path):
    directory = tmp_path / "ck"
    checkpoint.save_model(_model(1), str(directory))
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())
    files = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {checkpoint.MANIFEST}
    assert manifest["hash"] == "sha256" and set(manifest["files"]) == files
    assert {"megarope.json", "model/.metadata", "model/__0_0.distcp"} <= files
    assert all(entry["bytes"] == (directory / rel).stat().st_size
               and entry["sha256"] == hashlib.sha256((directory / rel).read_bytes()).hexdigest()
               for rel, entry in manifest["files"].items())
    assert checkpoint.read_meta(str(directory))["manifest"] == checkpoint.MANIFEST
    assert checkpoint.verify_checkpoint(str(directory)) is None

    shard = directory / "model" / "__0_0.distcp"
    original = shard.read_bytes()
    shard.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])  # same size, one bit
    assert checkpoint.verify_checkpoint(str(directory)) == \
        f"{shard} is corrupt: its contents changed since it was saved (SHA-256 differs)"
    shard.write_bytes(original[:1000])
    assert checkpoint.verify_checkpoint(str(directory)) == \
        f"{shard} is corrupt: 1,000 bytes, {len(original):,} when it was saved"
    shard.unlink()
    assert checkpoint.verify_checkpoint(str(directory)) == f"{shard} is missing"
    shard.write_bytes(original)
    (directory / "notes.txt").write_text("added by hand")  # a file the save did not write is not checked
    assert checkpoint.verify_checkpoint(str(directory)) is None
    (directory / checkpoint.MANIFEST).write_text('{"files": {"megarope.json": 3}}')
    assert checkpoint.verify_checkpoint(str(directory)) == \
        f"{directory / checkpoint.MANIFEST} is corrupt: not the manifest a save writes"


def test_a_checkpoint_saved_before_manifests_has_its_json_checked_only(world, tmp_path):
    directory = tmp_path / "ck"
    checkpoint.save_model(_model(1), str(directory))
    (directory / checkpoint.MANIFEST).unlink()
    assert checkpoint.verify_checkpoint(str(directory)) == \
        f"{directory / checkpoint.MANIFEST} is missing (its megarope.json says the save wrote one)"
    meta = checkpoint.read_meta(str(directory))
    del meta["manifest"]
    (directory / checkpoint.META).write_text(json.dumps(meta))
    assert checkpoint.verify_checkpoint(str(directory)) is None
    (directory / checkpoint.META).write_text('{"preset": ')
    problem = checkpoint.verify_checkpoint(str(directory))
    assert problem.startswith(f"{directory / checkpoint.META} is corrupt: not readable as JSON")
    with pytest.raises(UsageError, match="megarope.json is corrupt: not readable as JSON"):
        checkpoint.read_meta(str(directory))  # one line for every reader, not a JSONDecodeError


def test_a_save_the_file_system_refuses_is_one_line_and_leaves_the_old_checkpoint(world, tmp_path, monkeypatch):
    """Saving over an existing checkpoint when the file system fails mid-way (here EIO from the shard
    writer): one line naming the checkpoint and the error, the old checkpoint intact, nothing partial."""
    directory = tmp_path / "ck"
    old = _model(1)
    checkpoint.save_model(old, str(directory))

    def failing_save(state, path, *args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), os.path.join(path, "__0_0.distcp"))

    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", failing_save)
    with pytest.raises(UsageError) as error:
        checkpoint.save_model(_model(2), str(directory))
    assert str(error.value) == f"cannot save {directory}: Input/output error: " \
                               f"{checkpoint.partial_dir(str(directory))}/model/__0_0.distcp"
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no .ck.partial
    assert checkpoint.verify_checkpoint(str(directory)) is None
    monkeypatch.undo()
    again = _model(3)
    checkpoint.load_model(again, str(directory))
    assert _same_weights(old, again)


# ----------------------------------------------------------------------------------------------- the lock
HOLD_THE_LOCK = """
import sys, time
from megarope import checkpoint
with checkpoint.run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_one_run_at_a_time_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    root = tmp_path / "run"
    with checkpoint.run_lock(str(root)):
        holder = (root / checkpoint.LOCK).read_text()
        assert holder.startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UsageError) as error, checkpoint.run_lock(str(root)):
            pass
        message = str(error.value)
        assert message == (f"{root} is in use by another run ({holder.strip()} holds {root / checkpoint.LOCK}); "
                           f"wait for it to end, or give this run another checkpoint.dir")
    with checkpoint.run_lock(str(root)):  # released at the end of the first
        pass

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(root)], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(UsageError, match=f"pid {proc.pid} on "), checkpoint.run_lock(str(root)):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with checkpoint.run_lock(str(root)):  # the kernel let go of it with the process: nothing stale
        assert (root / checkpoint.LOCK).read_text().startswith(f"pid {os.getpid()} on ")


def _save_with_a_slow_writer(root):
    """Rank 0 (the one that writes a replicated model's shards) takes 8 s to write them; the default group
    (standing in for NCCL) waits 5 s at most."""
    import time

    from distributed import start_with_short_default_timeout

    start_with_short_default_timeout(5)
    parallel.init()
    model = _model(3)
    fsync = os.fsync

    def slow_fsync(fd):
        os.fsync = fsync
        time.sleep(8)
        return fsync(fd)

    if torch.distributed.get_rank() == 0:
        os.fsync = slow_fsync  # megatron's writer syncs each file it wrote
    checkpoint.save_model(model, os.path.join(root, "ckpt"), checkpoint.model_meta(model))
    return checkpoint.verify_checkpoint(os.path.join(root, "ckpt"))


@pytest.mark.slow
def test_a_save_waits_for_its_slowest_writer_on_the_long_wait_group(tmp_path):
    """megatron's save waits for every rank's shards in a barrier of the default group (NCCL's, with its
    10-minute watchdog, on GPUs): with the default group's timeout shorter than the slow rank's write, that
    failed; the ranks now meet on the host-side group first. (The long wait is AsyncRequest.execute_sync's
    barrier, right after each rank's write, not the closing barrier of dist_checkpointing.save, which only
    follows rank 0's small metadata write.)"""
    from distributed import run_distributed

    assert run_distributed(_save_with_a_slow_writer, 2, str(tmp_path), timeout=300) == [None, None]

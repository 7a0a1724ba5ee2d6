"""Checkpoints on megatron's dist_checkpointing: a directory that any TP/CP layout can load.

Layout of one checkpoint directory:
    megarope.json      what the model is: preset, RoPE config, lineage, tokenizer, backend, step, ...
    tokenizer.model    the sentencepiece model, when there is one (a checkpoint is self-contained),
    or tokenizer/      an HF tokenizer's files (tokenizer.json, tokenizer_config.json, ...)
    model/             dist_checkpointing of the model's sharded state dict
    manifest.json      the size and SHA-256 of every other file, written last (what verify_checkpoint checks)

A save is atomic: everything is written into a hidden sibling directory that is renamed into
place only when complete, so a crash mid-save never damages an existing checkpoint. A save is also
collective and fails together: when any rank's part cannot be written (a full disk, a file system
error), every rank stops with one line, the hidden directory is removed, and every earlier checkpoint
stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import re
import shutil
import socket
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megarope import parallel
from megarope.data import copy_tokenizer
from megarope.errors import UsageError, causes
from megarope.files import partial_dir, replace_dir, sha256_file, write_json_atomic, write_text_atomic
from megarope.parallel import is_main, wait_for_all
from megarope.trust import CONFIG_OPT_IN, FOREIGN, Trust, guarded_load

META = "megarope.json"
MANIFEST = "manifest.json"
EXTRA_STATE = "_extra_state"  # torch's key suffix for a module's get_extra_state()
# Less free space than this after a failed write means the disk is full (see _no_space_left).
FULL_BELOW_BYTES = 1 << 20
# The rank that wrote a file: megatron's writer names rank R's shards [group]__R_<i>.distcp (filesystem_async),
# save_training names rank R's RNG state rank/rank_R.json (rank_R.pt before); rank 0 writes everything else.
_SHARD_OWNER = re.compile(r"__(\d+)_\d+\.distcp$")
_RANK_FILE_OWNER = re.compile(r"^rank/rank_(\d+)\.(json|pt)$")


def _barrier():
    # rank 0 writes, renames and deletes while the others wait: a wait that may be long (parallel.py)
    wait_for_all()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gather(obj) -> list:
    """Every rank's ``obj``, on every rank. The ranks first meet on the long-wait group (parallel.py):
    they arrive after hashing at their own pace, which NCCL's watchdog would not wait for."""
    world = _rank_world()[1]
    if world == 1:
        return [obj]
    wait_for_all()
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def model_meta(model, **extra) -> dict:
    """What a loader needs to rebuild ``model`` (built by megarope.model.build_model)."""
    return {"preset": model.megarope_preset.to_dict(), "rope": asdict(model.megarope_rope),
            "backend": model.megarope_backend, **extra}


def _write_results_in_process() -> None:
    """Keep megatron's save from depending on a helper process that a stop signal kills.

    megatron's writer passes its write results through a multiprocessing Manager queue, a helper
    process spawned at the first save (filesystem_async.get_write_results_queue). A stop signal sent
    to every process of a run (Slurm signals all processes of a job step, torchrun a worker's process
    group) kills that helper too, and the very save the signal asked for fails (BrokenPipeError).
    megarope saves synchronously, so results are put and got in this process: a plain queue does the
    job with no helper. (The trade-off: it sets a module global of megatron's; megatron 0.19.2 offers
    no argument for it.)
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


# ----------------------------------------------------------------------------------------------- saving
class _SaveFailed(UsageError):
    """A save the file system refused: one line, on the rank that saw why."""


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, one of its causes, or a rank's failure that
    torch.distributed.checkpoint gathered into a CheckpointException (megatron wraps a writer's error
    in a RuntimeError there)."""
    return next((e for e in causes(error) if isinstance(e, OSError)), None)


def _no_space_left(path: str) -> bool:
    """Whether the file system of ``path`` is full. Asked after a write failed: torch's and megatron's
    writers report a full disk as a RuntimeError without its errno (torch's "unexpected pos", megatron's
    "Local worker 0 encountered an error"). A write that fails for want of space has filled the disk to
    the last block, and the failed save's files are still there when this is asked. (A quota, which
    statvfs does not see, gets the writer's own words instead.)"""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES


def _save_failure(error: BaseException, final_dir: str) -> UsageError | None:
    """One line for a save that the file system refused; None for anything else (a bug keeps its traceback)."""
    os_error = _os_error(error)
    if (os_error is None and isinstance(error, (RuntimeError, CheckpointException))
            and _no_space_left(os.path.dirname(os.path.abspath(final_dir)))):
        os_error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if os_error is not None:
        where = os.path.dirname(os.path.abspath(final_dir))
        if os_error.errno == errno.ENOSPC:
            reason = f"no space left on device in {where}"
        elif os_error.errno == errno.EDQUOT:
            reason = f"disk quota exceeded in {where}"
        else:
            reason = (os_error.strerror or str(os_error)) + (f": {os_error.filename}" if os_error.filename else "")
        return _SaveFailed(f"cannot save {final_dir}: {reason}")
    if isinstance(error, CheckpointException):  # megatron raises it on every rank; the reasons reach rank 0 only
        reason = _reason(error) if error.failures else "a rank could not write its part (see rank 0's message)"
        return _SaveFailed(f"cannot save {final_dir}: {reason}")
    return None


@contextlib.contextmanager
def _writer_errors_unlogged():
    """megatron logs a writer's failure (twice, at ERROR) before raising it; the save raises it as one line."""
    logger = logging.getLogger("megatron.core.dist_checkpointing")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _save_phase(final_dir: str):
    """One step of a collective save. Every rank stops at its end when any rank failed in it
    (parallel.fail_together: no rank is left waiting in a collective the others will not join), and a
    file system error becomes one line naming the checkpoint."""
    with parallel.fail_together():
        try:
            with _writer_errors_unlogged():
                yield
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            failure = _save_failure(e, final_dir)
            if failure is None:
                raise
            raise failure from e


@contextlib.contextmanager
def _atomic_save(final_dir: str, subdirs: tuple[str, ...]):
    """Yield the hidden directory that a collective save writes into (made by rank 0, with ``subdirs``);
    the body ends with _seal. When any rank fails, rank 0 removes the directory and every rank raises:
    one line for a file system error (_SaveFailed), the error itself for a bug. Nothing partial is
    left, and no earlier checkpoint or `latest` is touched."""
    _write_results_in_process()
    tmp = partial_dir(final_dir)
    try:
        with _save_phase(final_dir):
            if is_main():
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                for sub in ("",) + tuple(subdirs):
                    os.makedirs(os.path.join(tmp, sub), exist_ok=True)
        yield tmp
    except BaseException as e:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, UsageError) and not isinstance(e, _SaveFailed):  # e.g. fail_together's word from another rank
            raise _SaveFailed(f"cannot save {final_dir}: {e}") from e
        raise


def _owner(relpath: str) -> int:
    match = _SHARD_OWNER.search(relpath) or _RANK_FILE_OWNER.match(relpath)
    return int(match.group(1)) if match else 0


def _mine(relpaths, rank: int, world: int) -> list[str]:
    """The files this rank hashes: those the rank of its number wrote (rank 0 also those of ranks the
    world no longer has), so the reading is spread over the ranks as the writing was and, at save time,
    each reads what its own node just wrote."""
    return [rel for rel in relpaths if _owner(rel) % world == rank]


def _files(directory: str) -> list[str]:
    """Every file under ``directory`` but the manifest, relative, with "/" separators."""
    found = []
    for dirpath, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _seal(tmp: str, final_dir: str, meta: dict, tokenizer_file: str | None) -> None:
    """Finish a save (collective): the metadata, then the manifest, then the rename into place (rank 0).

    ``tokenizer_file``: a sentencepiece file or an HF tokenizer directory, copied in (data.copy_tokenizer)
    and recorded in the metadata by its name inside the checkpoint.
    """
    with _save_phase(final_dir):
        if is_main():
            if tokenizer_file:
                meta = {**meta, "tokenizer": copy_tokenizer(tokenizer_file, tmp)}
            write_json_atomic(os.path.join(tmp, META), {**meta, "manifest": MANIFEST})
    with _save_phase(final_dir):
        rank, world = _rank_world()
        digests = {rel: {"bytes": os.path.getsize(os.path.join(tmp, rel)), "sha256": sha256_file(os.path.join(tmp, rel))}
                   for rel in _mine(_files(tmp), rank, world)}
    files = {rel: entry for part in _gather(digests) for rel, entry in part.items()}
    with _save_phase(final_dir):
        if is_main():
            write_json_atomic(os.path.join(tmp, MANIFEST), {"hash": "sha256", "files": dict(sorted(files.items()))})
            replace_dir(tmp, final_dir)


def _dist_save(sharded_state_dict: dict, directory: str) -> None:
    """dist_checkpointing.save, the ranks meeting on the long-wait group (parallel.py) once each has written.

    megatron's synchronous save (0.19.2: TorchDistSaveShardedStrategy.save, AsyncRequest.execute_sync) writes
    each rank's shards and then waits for every rank in a barrier of the default group: NCCL's on GPUs, whose
    watchdog ends the job when the slowest writer (a 70B optimizer state on a network file system) takes longer
    than its timeout. This runs the same request, megatron's own, with the ranks meeting before the barrier
    (parallel.fail_together: also, a rank whose write raised stops them all there)."""
    request = dist_checkpointing.save(sharded_state_dict, directory, async_sharded_save=True, async_strategy="mcore")
    write = request.async_fn

    def write_then_wait(*args, **kwargs):
        with parallel.fail_together():  # the wait, and a rank whose write raised stops every rank before the barrier
            if write is not None:
                write(*args, **kwargs)

    request._replace(async_fn=write_then_wait).execute_sync()  # a NamedTuple's own copy-with-changes


def save_model(model, directory: str, meta: dict | None = None, tokenizer_file: str | None = None) -> None:
    """Save just the model (a converted or final checkpoint). Collective: every rank calls it."""
    with _atomic_save(directory, ("model",)) as tmp:
        with _save_phase(directory):
            _dist_save(model.sharded_state_dict(), os.path.join(tmp, "model"))
        _seal(tmp, directory, meta if meta is not None else model_meta(model), tokenizer_file)


def _read_json(directory: str, name: str, kind: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise UsageError(f"not a {kind} (no {name}): {directory}")
    problem, value = _json_object(path)
    if problem:
        raise UsageError(problem)
    return value


def _json_object(path: str) -> tuple[str | None, dict | None]:
    """(what is wrong with the JSON object in ``path``, or None; the object)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        return f"{path} is missing", None
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 decoding
        return f"{path} is corrupt: not readable as JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})", None
    if not isinstance(value, dict):
        return f"{path} is corrupt: not a JSON object", None
    return None, value


def _reason(error: BaseException) -> str:
    """The first line of what went wrong, looking through torch's CheckpointException to a rank's error."""
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]
    while isinstance(error.__cause__, BaseException) and not str(error):
        error = error.__cause__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


@contextlib.contextmanager
def _one_line_load_errors(what: str):
    """A load that fails (a truncated or damaged file that no manifest caught, an older format) ends in
    one line naming ``what`` rather than a traceback."""
    try:
        yield
    except UsageError:
        raise
    except (Exception, CheckpointException) as e:
        raise UsageError(f"cannot load {what}: {_reason(e)}") from e


def read_meta(directory: str) -> dict:
    return _read_json(directory, META, "megarope checkpoint")


def tokenizer_path(directory: str) -> str | None:
    """The tokenizer a checkpoint carries: a file or HF tokenizer directory inside it, or a spec such as "bytes"."""
    name = read_meta(directory).get("tokenizer")
    if name is None:
        return None
    inside = os.path.join(directory, name)
    return inside if os.path.exists(inside) else name


def _refuse_mismatch(directory: str, in_checkpoint_only, in_model_only) -> None:
    """One line naming the keys that do not match, unless they are only modules' extra state.

    Transformer Engine's modules (norms, attention) carry ``_extra_state`` (FP8 metadata, often
    empty) that the local backend's modules lack, so a checkpoint of one backend loads into the other;
    any other key that only one side has is a different model.
    """
    def real(keys):
        return sorted(k for k in keys if not k.endswith(EXTRA_STATE))

    problems = []
    for what, keys in (("not in the model", real(in_checkpoint_only)), ("not in the checkpoint", real(in_model_only))):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} key(s) {what} ({shown})")
    if problems:
        raise UsageError(f"{directory} does not fit this model: {'; '.join(problems)}")


def load_model(model, directory: str, trust: Trust = FOREIGN) -> None:
    """Load a checkpoint's weights into ``model``, whatever TP/CP layout and backend either side has.

    ``trust``: how far the load trusts the checkpoint (megarope.trust: FOREIGN, the default, loads
    nothing that can run code and refuses, in one line, a checkpoint that needs it). Only
    ``_extra_state`` keys may be missing on either side (a "local" checkpoint into a "te" model and
    back); any other mismatch raises UsageError.
    """
    read_meta(directory)
    with guarded_load(directory, trust, ("model",), model):
        _load_weights(model, directory)


def _load_weights(model, directory: str) -> None:
    """The load itself (inside guarded_load). dist_checkpointing's StrictHandling.RETURN_ALL reports both
    kinds of mismatch (checkpoint-only keys need the ranks' metadata, which dist_checkpointing's integrity
    check gathers anyway) and leaves the model-only keys out of the load."""
    with _one_line_load_errors(os.path.join(directory, "model")):
        state, checkpoint_only, model_only = dist_checkpointing.load(
            model.sharded_state_dict(), os.path.join(directory, "model"), strict=StrictHandling.RETURN_ALL)
    _refuse_mismatch(directory, checkpoint_only, model_only)
    result = model.load_state_dict(state, strict=False)
    _refuse_mismatch(directory, result.unexpected_keys, result.missing_keys)


def build_from_checkpoint(directory: str, backend: str | None = None, rope_overrides: dict | None = None,
                          trust: Trust = FOREIGN, **config_kwargs):
    """Rebuild the model a checkpoint describes (for the current parallel state) and load it (load_model,
    with ``trust``).

    Building needs megatron's parallel state: without one (a plain process, or after parallel.destroy())
    this sets up a world of one (parallel.ensure) and leaves it to the model; parallel.destroy() ends it.
    ``rope_overrides`` changes the RoPE config at load time (a new base, dynamic NTK, log-scaling):
    RoPE has no weights, so any checkpoint can be evaluated or trained with any of them.
    """
    from megarope.model import Preset, build_model
    from megarope.rope import RopeConfig

    meta = read_meta(directory)
    rope = RopeConfig(**{**meta["rope"], **(rope_overrides or {})})
    parallel.ensure()
    model = build_model(Preset(**meta["preset"]), rope, backend or meta.get("backend", "local"), **config_kwargs)
    load_model(model, directory, trust)
    return model


# ----------------------------------------------------------------------------------------------- training
# A training run's checkpoint.dir:
#     step_0000100/      one checkpoint: the model directory above (megarope.json, model/, manifest.json), plus
#         optimizer/       dist_checkpointing of the optimizer's sharded state (any layout reads it)
#         rank/            rank_00000.json ...: each rank's RNG states (torch, CUDA, python, numpy), JSON
#                          (rank_00000.pt, a torch.save pickle, before: still read, weights-only)
#         train_state.json step, consumed samples, scheduler, NaN skips, the config, the layout, the data's fingerprint
#     latest             the name of the newest complete checkpoint, replaced atomically after it exists
#     .step_0000200.partial/   a save in progress (or one killed mid-way): never read, removed on start
#     .lock              held (flock) by the run that uses the directory: see run_lock
# A step directory is a model checkpoint too: evaluation and init.from read it like any other.

LATEST = "latest"
TRAIN_STATE = "train_state.json"
# A resume loads the run's own checkpoints (megarope.trust); what it refuses can still give its weights.
RESUME = Trust("own", f"start a new checkpoint.dir from its weights (init.from and {CONFIG_OPT_IN})")
LOCK = ".lock"
ON_CORRUPT = ("error", "previous")
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def training_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the complete step directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, META)) and os.path.isfile(os.path.join(path, TRAIN_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _pointer(root: str) -> tuple[str | None, str | None]:
    """(the step directory ``root/latest`` names, the problem with it): (None, None) without the file.
    A pointer to a step that is gone or incomplete gives both (the path and why it is no checkpoint)."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None, None
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, ValueError) as e:
        return None, f"{pointer} is unreadable ({e})"
    if not _STEP_DIR.match(name):
        return None, f"{pointer} names {name[:40]!r}, which is not a complete checkpoint"
    path = os.path.join(root, name)
    missing = [f for f in (META, TRAIN_STATE) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        why = "no such directory" if not os.path.isdir(path) else "no " + " and no ".join(missing)
        return path, f"{pointer} names {name!r}, which is not a complete checkpoint ({why})"
    return path, None


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint that ``root/latest`` names; without that file, the newest complete step directory.
    Neither reads nor verifies its files (resume_point does)."""
    path, problem = _pointer(root)
    if problem:
        raise UsageError(problem)
    if path:
        return path
    found = training_checkpoints(root)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------- verifying
def _manifest(directory: str) -> tuple[str | None, dict | None]:
    """(the problem, the manifest's files). Files None: a checkpoint saved before manifests, whose
    megarope.json and train_state.json are then only checked to be JSON."""
    path = os.path.join(directory, MANIFEST)
    if os.path.isfile(path):
        problem, manifest = _json_object(path)
        if problem:
            return problem, None
        files = manifest.get("files")
        if not (isinstance(files, dict) and all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                                and isinstance(e.get("sha256"), str) for e in files.values())):
            return f"{path} is corrupt: not the manifest a save writes", None
        return None, files
    problem, meta = _json_object(os.path.join(directory, META))
    if problem:
        return problem, None
    if meta.get("manifest"):
        return f"{path} is missing (its {META} says the save wrote one)", None
    state_path = os.path.join(directory, TRAIN_STATE)
    return (_json_object(state_path)[0] if os.path.exists(state_path) else None), None


def _check_file(directory: str, rel: str, entry: dict) -> str | None:
    path = os.path.join(directory, rel)
    try:
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            return f"{path} is corrupt: {size:,} bytes, {entry['bytes']:,} when it was saved"
        if sha256_file(path) != entry["sha256"]:
            return f"{path} is corrupt: its contents changed since it was saved (SHA-256 differs)"
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as e:
        return f"{path} cannot be read ({e.strerror})"
    return None


def verify_checkpoint(directory: str) -> str | None:
    """What is wrong with a checkpoint, in one line naming the file, or None when every file is as its
    save wrote it (size and SHA-256, as manifest.json records them). Collective, and every rank gets the
    same answer: each rank checks the files that the rank of its number wrote (_mine), so a resume reads
    the checkpoint once more, spread over the job. Sizes alone would catch truncation but not a damaged
    block; a load error alone would miss damage inside tensor data, which loads without complaint.
    Files the manifest does not list (added later) are not checked.
    """
    problem, files = _manifest(directory)
    rank, world = _rank_world()
    mine = None
    if problem is None and files is not None:
        mine = next(filter(None, (_check_file(directory, rel, files[rel]) for rel in _mine(files, rank, world))), None)
    found = [p for p in _gather(mine) if p]
    return problem or (found[0] if found else None)


def resume_point(root: str, on_corrupt: str = "error") -> tuple[str | None, list[str]]:
    """The checkpoint a run in ``root`` resumes from (None: none yet), verified, and what was skipped on
    the way. Collective: every rank gets the same answer (or the same error).

    The candidate is the one `latest` names, else the newest complete step directory. When `latest`
    names no complete checkpoint, or the candidate fails verify_checkpoint: with ``on_corrupt``
    "error" (the default) one line names the file; with "previous" the reason is noted and the next
    older complete checkpoint is tried, and only when none is intact does it raise, rather than start
    over beside checkpoints that exist.
    """
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    hint = "checkpoint.on_corrupt=previous resumes from the newest intact checkpoint before it"
    skipped = []
    candidates = [path for _, path in reversed(training_checkpoints(root))]
    named, problem = _pointer(root)
    if problem:
        if on_corrupt == "error":
            raise UsageError(f"{problem}; {hint}")
        skipped.append(problem)
    if named:  # the step `latest` names (when complete), then the ones before it
        candidates = ([] if problem else [named]) + [path for path in candidates if _step_of(path) < _step_of(named)]
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        if on_corrupt == "error":
            raise UsageError(f"{problem}; {path} cannot be resumed from ({hint})")
        skipped.append(problem)
    if skipped:
        raise UsageError(f"no intact checkpoint to resume from in {root}: {'; '.join(skipped)}")
    return None, []


def _step_of(path: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(path)).group(1))


# ----------------------------------------------------------------------------------------------- one run at a time
@contextlib.contextmanager
def run_lock(root: str):
    """Hold ``root`` (a checkpoint.dir, made if missing) for one run: while it is held, a second run on
    the same directory is refused with one line, before it reads or writes anything there (it would
    delete the first run's save in progress, cut its metrics and race its checkpoints). Collective:
    rank 0 takes the lock and the refusal reaches every rank (parallel.fail_together).

    Why fcntl.flock on root/.lock: the kernel releases it when the process ends however it ends
    (SIGKILL, an out-of-memory kill, a crash), so a dead run never leaves a stale lock for a person to
    clean up, as a PID file would. The file stays (deleting it would let two runs lock two different
    files); it names its holder for the refusal. Across machines it holds where the file system
    supports flock: Linux's NFS client turns it into NFS locks (NFSv4, or v3 with lockd), Lustre only
    when mounted with -o flock (with -o localflock it holds per node only), GPFS and local disks
    always. Where the file system refuses flock, the run warns in one line and goes on unlocked.
    """
    handle = None
    with parallel.fail_together():
        if is_main():
            handle = _take_lock(root)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def _take_lock(root: str):
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process"
        handle.close()
        raise UsageError(f"{root} is in use by another run ({holder} holds {path}); wait for it to end, "
                         f"or give this run another checkpoint.dir") from None
    except OSError as e:
        print(f"megarope: warning: cannot lock {path} ({e.strerror}): nothing stops a second run on {root}",
              file=sys.stderr, flush=True)
        return handle
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
    except OSError:
        pass  # who holds it is for the message only (a full disk must not stop the run here)
    return handle


# ----------------------------------------------------------------------------------------------- training saves
def remove_partial_saves(root: str) -> list[str]:
    """Delete what interrupted saves left behind (rank 0, before the first save of a run, holding run_lock)."""
    removed = []
    if is_main() and os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".") and (name.endswith(".partial") or name.endswith(".partial.old")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
            elif name.startswith(LATEST + ".tmp"):
                os.remove(os.path.join(root, name))
    _barrier()
    return removed


def _write_latest(root: str, name: str) -> None:
    write_text_atomic(os.path.join(root, LATEST), name + "\n")


def _prune(root: str, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``; later ones (from a run that was resumed
    from an earlier step) are left until this run replaces them."""
    older = [path for s, path in training_checkpoints(root) if s <= step]
    for path in older[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def _chunks(model) -> list:
    """A model, or the list of a rank's model chunks (virtual pipeline stages), as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _sharded_model_state(model) -> dict:
    """One sharded state dict for a model or its chunks. Keys are global (megatron numbers layers
    across pipeline stages), so a checkpoint saved at any TP/CP/PP layout is one model checkpoint."""
    chunks = _chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_training(root: str, step: int, model, optimizer, state: dict, rank_state: dict, meta: dict,
                  keep: int, tokenizer_file: str | None = None, optimizer_metadata: dict | None = None) -> str:
    """Save one training checkpoint atomically, point ``latest`` at it, keep the newest ``keep``.

    Collective: every rank calls it. ``model`` is the bare GPTModel (not its DDP wrapper), or the list
    of this rank's model chunks (virtual pipeline stages), so the model part has the keys of
    save_model's; ``optimizer`` offers megatron's ``sharded_state_dict(model_sharded_state_dict,
    is_loading, metadata=...)``, called with ``optimizer_metadata`` (recorded in train_state.json,
    and used again by load_training); ``state`` (JSON-ready, the same on every rank) is written by
    rank 0; ``rank_state`` (JSON-ready: read back without unpickling anything) by each rank.

    A save that the file system refuses on any rank (no space left, a quota, an I/O error) raises
    UsageError on every rank, one line naming the checkpoint and why; the partial directory is gone
    and `latest` still names the previous checkpoint, intact.
    """
    final = step_dir(root, step)
    optimizer_metadata = dict(optimizer_metadata or {})
    with _atomic_save(final, ("model", "optimizer", "rank")) as tmp:
        with _save_phase(final):
            model_sd = _sharded_model_state(model)
            optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=optimizer_metadata)
            _dist_save(model_sd, os.path.join(tmp, "model"))
            _dist_save(optimizer_sd, os.path.join(tmp, "optimizer"))
            rank = dist.get_rank() if dist.is_initialized() else 0
            write_json_atomic(os.path.join(tmp, "rank", f"rank_{rank:05d}.json"), rank_state)
            if is_main():
                write_json_atomic(os.path.join(tmp, TRAIN_STATE),
                                  {**state, "step": step, "optimizer_metadata": optimizer_metadata})
        _seal(tmp, final, meta, tokenizer_file)  # metadata, manifest, then the rename (rank 0)
    with _save_phase(final):
        if is_main():
            _write_latest(root, os.path.basename(final))
            _prune(root, step, keep)
    return final


def read_train_state(directory: str) -> dict:
    return _read_json(directory, TRAIN_STATE, "training checkpoint")


def load_training(directory: str, model, optimizer, trust: Trust = RESUME) -> tuple[dict, dict | None]:
    """Restore the model (or this rank's model chunks) and the optimizer of a training checkpoint
    (collective), the optimizer in the format its train_state.json records; ``trust``: see
    megarope.trust (RESUME: the run's own checkpoint.dir).

    Returns the train state (see save_training) and this rank's rank_state (as save_training got it,
    or from an older checkpoint's rank_R.pt: tensors and tuples), or None when the checkpoint was
    written by fewer ranks than this run has. A file that cannot be loaded raises UsageError naming it
    (verify_checkpoint, run first, catches what its manifest can).
    """
    state = read_train_state(directory)
    read_meta(directory)
    with guarded_load(directory, trust, ("model", "optimizer"), _chunks(model)):
        for chunk in _chunks(model):
            _load_weights(chunk, directory)
        model_sd = _sharded_model_state(model)
        optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                    metadata=dict(state.get("optimizer_metadata") or {}))
        with _one_line_load_errors(os.path.join(directory, "optimizer")):
            optimizer.load_state_dict(dist_checkpointing.load(optimizer_sd, os.path.join(directory, "optimizer")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    return state, read_rank_state(os.path.join(directory, "rank", f"rank_{rank:05d}"), trust)


def read_rank_state(stem: str, trust: Trust) -> dict | None:
    """A rank's state from ``stem``.json, or from ``stem``.pt (what megarope wrote before): that is
    torch.save's pickle, read weights-only with the numpy types an RNG state holds allowed, so a file
    that holds anything else is refused before it is built. None when neither exists."""
    if os.path.isfile(stem + ".json"):
        problem, value = _json_object(stem + ".json")
        if problem:
            raise UsageError(problem)
        return value
    if not os.path.isfile(stem + ".pt"):
        return None
    with (guarded_load(os.path.dirname(os.path.dirname(stem)), trust, parts=()), _one_line_load_errors(stem + ".pt"),
          torch.serialization.safe_globals(_numpy_rng_types())):
        return torch.load(stem + ".pt", weights_only=True)


def _numpy_rng_types() -> list:
    """What numpy.random.get_state() pickles besides plain data: a uint32 array."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]

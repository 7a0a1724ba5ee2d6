"""Checkpoints on megatron's dist_checkpointing: a directory that any TP/CP layout can load.

Layout of one checkpoint directory:
    megarope.json      what the model is: preset, RoPE config, lineage, tokenizer, backend, step, ...
    tokenizer.model    the sentencepiece model, when there is one (a checkpoint is self-contained),
    or tokenizer/      an HF tokenizer's files (tokenizer.json, tokenizer_config.json, ...)
    model/             dist_checkpointing of the model's sharded state dict

A save is atomic: everything is written into a hidden sibling directory that is renamed into
place only when complete, so a crash mid-save never damages an existing checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.validation import StrictHandling

from megarope.data import copy_tokenizer
from megarope.errors import UsageError
from megarope.files import partial_dir, replace_dir, write_json_atomic, write_text_atomic
from megarope.parallel import is_main, wait_for_all

META = "megarope.json"
# Transformer Engine (>= 2.18) unpickles the FP8 delayed-scaling state of a checkpoint only when this is 1.
UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
EXTRA_STATE = "_extra_state"  # torch's key suffix for a module's get_extra_state()


def _barrier():
    # rank 0 writes, renames and deletes while the others wait: a wait that may be long (parallel.py)
    wait_for_all()


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


def begin_save(final_dir: str, subdirs: tuple[str, ...] = ()) -> str:
    """Make (on rank 0) and return the temporary directory a save writes into, with ``subdirs``."""
    _write_results_in_process()
    tmp = partial_dir(final_dir)
    if is_main():
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("",) + tuple(subdirs):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    _barrier()
    return tmp


def finish_save(tmp: str, final_dir: str, meta: dict, tokenizer_file: str | None = None) -> None:
    """Write the metadata last, then swap the finished directory into place (rank 0).

    ``tokenizer_file``: a sentencepiece file or an HF tokenizer directory, copied in (data.copy_tokenizer)
    and recorded in the metadata by its name inside the checkpoint.
    """
    _barrier()
    if is_main():
        if tokenizer_file:
            meta = {**meta, "tokenizer": copy_tokenizer(tokenizer_file, tmp)}
        write_json_atomic(os.path.join(tmp, META), meta)
        replace_dir(tmp, final_dir)
    _barrier()


def save_model(model, directory: str, meta: dict | None = None, tokenizer_file: str | None = None) -> None:
    """Save just the model (a converted or final checkpoint). Collective: every rank calls it."""
    tmp = begin_save(directory, subdirs=("model",))
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(tmp, "model"))
    finish_save(tmp, directory, meta if meta is not None else model_meta(model), tokenizer_file)


def _read_json(directory: str, name: str, kind: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise UsageError(f"not a {kind} (no {name}): {directory}")
    with open(path) as f:
        return json.load(f)


def read_meta(directory: str) -> dict:
    return _read_json(directory, META, "megarope checkpoint")


def tokenizer_path(directory: str) -> str | None:
    """The tokenizer a checkpoint carries: a file or HF tokenizer directory inside it, or a spec such as "bytes"."""
    name = read_meta(directory).get("tokenizer")
    if name is None:
        return None
    inside = os.path.join(directory, name)
    return inside if os.path.exists(inside) else name


@contextlib.contextmanager
def trusted_extra_state():
    """Let Transformer Engine unpickle FP8 metadata while megarope loads a checkpoint it wrote itself.

    TE >= 2.18 refuses pickled ``_extra_state`` (FP8 delayed scaling's) unless
    NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1, since unpickling can run code. A megarope checkpoint
    (it has megarope.json) comes from megarope's own saves, so the variable is set for the load only
    and restored afterwards. The default recipe (tensorwise) stores no pickle at all.
    """
    previous = os.environ.get(UNSAFE_PICKLE_ENV)
    os.environ[UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(UNSAFE_PICKLE_ENV, None)
        else:
            os.environ[UNSAFE_PICKLE_ENV] = previous


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


def load_model(model, directory: str) -> None:
    """Load a checkpoint's weights into ``model``, whatever TP/CP layout and backend either side has.

    Only ``_extra_state`` keys may be missing on either side (a "local" checkpoint into a "te" model
    and back); any other mismatch raises UsageError. dist_checkpointing's StrictHandling.RETURN_ALL
    reports both kinds of mismatch (checkpoint-only keys need the ranks' metadata, which
    dist_checkpointing's integrity check gathers anyway) and leaves the model-only keys out of the load.
    """
    read_meta(directory)
    with trusted_extra_state():
        state, checkpoint_only, model_only = dist_checkpointing.load(
            model.sharded_state_dict(), os.path.join(directory, "model"), strict=StrictHandling.RETURN_ALL)
        _refuse_mismatch(directory, checkpoint_only, model_only)
        result = model.load_state_dict(state, strict=False)
    _refuse_mismatch(directory, result.unexpected_keys, result.missing_keys)


def build_from_checkpoint(directory: str, backend: str | None = None, rope_overrides: dict | None = None, **config_kwargs):
    """Rebuild the model a checkpoint describes (for the current parallel state) and load it.

    ``rope_overrides`` changes the RoPE config at load time (a new base, dynamic NTK, log-scaling):
    RoPE has no weights, so any checkpoint can be evaluated or trained with any of them.
    """
    from megarope.model import Preset, build_model
    from megarope.rope import RopeConfig

    meta = read_meta(directory)
    rope = RopeConfig(**{**meta["rope"], **(rope_overrides or {})})
    model = build_model(Preset(**meta["preset"]), rope, backend or meta.get("backend", "local"), **config_kwargs)
    load_model(model, directory)
    return model


# ----------------------------------------------------------------------------------------------- training
# A training run's checkpoint.dir:
#     step_0000100/      one checkpoint: the model directory above (megarope.json, model/), plus
#         optimizer/       dist_checkpointing of the optimizer's sharded state (any layout reads it)
#         rank/            rank_00000.pt ...: each rank's RNG states (torch, CUDA, python, numpy)
#         train_state.json step, consumed samples, scheduler, NaN skips, the config, the layout
#     latest             the name of the newest complete checkpoint, replaced atomically after it exists
#     .step_0000200.partial/   a save in progress (or one killed mid-way): never read, removed on start
# A step directory is a model checkpoint too: evaluation and init.from read it like any other.

LATEST = "latest"
TRAIN_STATE = "train_state.json"
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


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint that ``root/latest`` names; without that file, the newest complete step directory."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(root, name)
        if not (_STEP_DIR.match(name) and os.path.isfile(os.path.join(path, TRAIN_STATE))):
            raise UsageError(f"{pointer} names {name!r}, which is not a complete checkpoint")
        return path
    found = training_checkpoints(root)
    return found[-1][1] if found else None


def remove_partial_saves(root: str) -> list[str]:
    """Delete what interrupted saves left behind (rank 0, before the first save of a run)."""
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
    rank 0; ``rank_state`` (anything torch.save takes) by each rank.
    """
    final = step_dir(root, step)
    optimizer_metadata = dict(optimizer_metadata or {})
    tmp = begin_save(final, subdirs=("model", "optimizer", "rank"))
    model_sd = _sharded_model_state(model)
    optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=optimizer_metadata)
    dist_checkpointing.save(model_sd, os.path.join(tmp, "model"))
    dist_checkpointing.save(optimizer_sd, os.path.join(tmp, "optimizer"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(rank_state, os.path.join(tmp, "rank", f"rank_{rank:05d}.pt"))
    if is_main():
        write_json_atomic(os.path.join(tmp, TRAIN_STATE),
                          {**state, "step": step, "optimizer_metadata": optimizer_metadata})
    finish_save(tmp, final, meta, tokenizer_file)  # metadata last, then the rename (rank 0), barriers
    if is_main():
        _write_latest(root, os.path.basename(final))
        _prune(root, step, keep)
    _barrier()
    return final


def read_train_state(directory: str) -> dict:
    return _read_json(directory, TRAIN_STATE, "training checkpoint")


def load_training(directory: str, model, optimizer) -> tuple[dict, dict | None]:
    """Restore the model (or this rank's model chunks) and the optimizer of a training checkpoint
    (collective), the optimizer in the format its train_state.json records.

    Returns the train state (see save_training) and this rank's rank_state, or None when the
    checkpoint was written by fewer ranks than this run has.
    """
    state = read_train_state(directory)
    for chunk in _chunks(model):
        load_model(chunk, directory)
    model_sd = _sharded_model_state(model)
    optimizer_sd = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                metadata=dict(state.get("optimizer_metadata") or {}))
    optimizer.load_state_dict(dist_checkpointing.load(optimizer_sd, os.path.join(directory, "optimizer")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = os.path.join(directory, "rank", f"rank_{rank:05d}.pt")
    rank_state = torch.load(path, weights_only=False) if os.path.isfile(path) else None
    return state, rank_state

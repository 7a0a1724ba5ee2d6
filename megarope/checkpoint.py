"""Checkpoints on megatron's dist_checkpointing: a directory that any TP/CP layout can load.

Layout of one checkpoint directory:
    megarope.json      what the model is: preset, RoPE config, tokenizer, backend, step, ...
    tokenizer.model    the sentencepiece model, when there is one (a checkpoint is self-contained)
    model/             dist_checkpointing of the model's sharded state dict

A save is atomic: everything is written into a hidden sibling directory that is renamed into
place only when complete, so a crash mid-save never damages an existing checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megarope.errors import UsageError
from megarope.files import partial_dir, replace_dir, write_json_atomic, write_text_atomic
from megarope.parallel import is_main, wait_for_all

META = "megarope.json"


def _barrier():
    # rank 0 writes, renames and deletes while the others wait: a wait that may be long (parallel.py)
    wait_for_all()


def model_meta(model, **extra) -> dict:
    """What a loader needs to rebuild ``model`` (built by megarope.model.build_model)."""
    return {"preset": model.megarope_preset.to_dict(), "rope": asdict(model.megarope_rope),
            "backend": model.megarope_backend, **extra}


def begin_save(final_dir: str, subdirs: tuple[str, ...] = ()) -> str:
    """Make (on rank 0) and return the temporary directory a save writes into, with ``subdirs``."""
    tmp = partial_dir(final_dir)
    if is_main():
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("",) + tuple(subdirs):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    _barrier()
    return tmp


def finish_save(tmp: str, final_dir: str, meta: dict, tokenizer_file: str | None = None) -> None:
    """Write the metadata last, then swap the finished directory into place (rank 0)."""
    _barrier()
    if is_main():
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.model"))
            meta = {**meta, "tokenizer": "tokenizer.model"}
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
    """The tokenizer a checkpoint carries: a file inside it, or a spec such as "bytes"."""
    name = read_meta(directory).get("tokenizer")
    if name is None:
        return None
    inside = os.path.join(directory, name)
    return inside if os.path.exists(inside) else name


def load_model(model, directory: str) -> None:
    """Load a checkpoint's weights into ``model``, whatever TP/CP layout either side has."""
    read_meta(directory)
    state = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(directory, "model"))
    model.load_state_dict(state)


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

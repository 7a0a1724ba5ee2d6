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
import shutil
from dataclasses import asdict

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megarope.errors import UsageError

META = "megarope.json"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_meta(model, **extra) -> dict:
    """What a loader needs to rebuild ``model`` (built by megarope.model.build_model)."""
    return {"preset": model.megarope_preset.to_dict(), "rope": asdict(model.megarope_rope),
            "backend": model.megarope_backend, **extra}


def begin_save(final_dir: str, subdirs: tuple[str, ...] = ()) -> str:
    """Make (on rank 0) and return the temporary directory a save writes into, with ``subdirs``."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(final_dir))}.partial")
    if _rank0():
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("",) + tuple(subdirs):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    _barrier()
    return tmp


def finish_save(tmp: str, final_dir: str, meta: dict, tokenizer_file: str | None = None) -> None:
    """Write the metadata last, then swap the finished directory into place (rank 0)."""
    _barrier()
    if _rank0():
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.model"))
            meta = {**meta, "tokenizer": "tokenizer.model"}
        write_json_atomic(os.path.join(tmp, META), meta)
        old = None
        if os.path.exists(final_dir):  # replace an existing one without a moment of having none
            old = f"{tmp}.old"
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        if old:
            shutil.rmtree(old)
    _barrier()


def save_model(model, directory: str, meta: dict | None = None, tokenizer_file: str | None = None) -> None:
    """Save just the model (a converted or final checkpoint). Collective: every rank calls it."""
    tmp = begin_save(directory, subdirs=("model",))
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(tmp, "model"))
    finish_save(tmp, directory, meta if meta is not None else model_meta(model), tokenizer_file)


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise UsageError(f"not a megarope checkpoint (no {META}): {directory}")
    with open(path) as f:
        return json.load(f)


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

"""The few fixes megatron-core 0.19 needs to run on a CPU (gloo), applied once.

megatron-core assumes CUDA in a handful of places (see docs/platform notes in the README).
Each fix below is narrow, does nothing when CUDA is used, and is the only place in megarope
that knows it may be running without a GPU.

``MEGAROPE_DEVICE=cpu`` runs on the CPU (gloo, CPU tensors) even where a GPU exists -- the test
suite sets it for everything outside tests/gpu. megarope and megatron-core ask
``torch.cuda.is_available()`` in many places, so answering False there is the one switch that makes
them all take the CPU path together; :func:`restore` undoes it (tests that run GPU tests after
CPU ones in the same process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
import warnings

DEVICE_ENV = "MEGAROPE_DEVICE"

_applied = False
_originals: dict = {}  # (object, attribute name) -> what apply() replaced

# What megatron-core and torch say on every start without a GPU, TE or apex: true, and no news.
_NOISE = (".*(Transformer Engine|Apex|apex).*(not installed|Falling back).*", "Could not determine rank",
          "full scope is deprecated")


def quiet() -> None:
    """Silence the notices megatron-core and torch print on every run (idempotent).

    Called once by the CLI, so a bad input really ends in one line on stderr.
    """
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*ShardedTensor.*")
    # megatron logs its config dumps, deprecations and fallbacks at INFO/WARNING: not for a user
    for name in ("megatron", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _NullStream:
    """Stands in for a CUDA stream: CPU work is already ordered, so waits are no-ops."""

    def wait_event(self, *_):
        pass

    def wait_stream(self, *_):
        pass

    def synchronize(self):
        pass

    def record_event(self, *_):
        return None


def cpu_forced() -> bool:
    """Whether MEGAROPE_DEVICE asks for the CPU."""
    return os.environ.get(DEVICE_ENV, "").strip().lower() == "cpu"


def uses_cuda() -> bool:
    """Whether megarope runs on CUDA: a GPU is there and MEGAROPE_DEVICE does not say cpu."""
    import torch

    return not cpu_forced() and torch.cuda.is_available()


def _patch(owner, name: str, value) -> None:
    _originals.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, value)


class _TorchWithCpuForCuda(types.ModuleType):
    """torch as megatron's pipeline schedules see it: a tensor they make on device "cuda" lands on the CPU.

    The schedules (forward_backward_no_pipelining and both pipelined ones) count loss tokens in
    ``torch.zeros([], dtype=torch.int, device="cuda")``; every other name is torch's own.
    """

    def __init__(self, torch_module):
        super().__init__("torch")
        self._torch = torch_module

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def zeros(self, *size, device=None, **kwargs):
        if device is not None and str(device).startswith("cuda"):
            device = "cpu"
        return self._torch.zeros(*size, device=device, **kwargs)


def _no_cuda_rng_state(*_, **__):
    """What megatron's recompute saves as "the CUDA RNG state" on a CPU: nothing (see apply, 13)."""
    import torch

    return torch.empty(0, dtype=torch.uint8)


def apply() -> None:
    """Patch megatron-core's CUDA assumptions when no GPU is used. Idempotent."""
    import torch
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as megatron_random

    global _applied
    if _applied or uses_cuda():
        return
    _applied = True
    if torch.cuda.is_available():  # MEGAROPE_DEVICE=cpu on a GPU machine: every caller sees no GPU
        _patch(torch.cuda, "is_available", lambda: False)
    # 1. Buffers and rotary tables are put on torch.cuda.current_device(): make that the CPU.
    _patch(torch.cuda, "current_device", lambda: torch.device("cpu"))
    # 6. dist_checkpointing syncs the GPU before and after saving (and pipeline p2p after each exchange).
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    # 10. DDP's gradient sync orders its buckets on the current CUDA stream.
    _patch(torch.cuda, "current_stream", lambda *a, **k: _NullStream())
    _patch(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    # 12. The pipeline schedules count loss tokens in a tensor made on device="cuda" (the only CUDA
    # literal in them): only the schedules module sees a torch whose zeros() maps "cuda" to the CPU.
    _patch(schedules, "torch", _TorchWithCpuForCuda(torch))
    # 13. Activation recompute (tensor_parallel.checkpoint) saves and restores the CPU RNG state and
    # "the CUDA RNG state" around the recomputed forward. Without CUDA there is no CUDA generator: the
    # CPU state, which is what CPU dropout draws from, is already saved and restored beside it, so
    # the CUDA half is empty and setting it does nothing.
    _patch(megatron_random, "_get_cuda_rng_state", _no_cuda_rng_state)
    _patch(megatron_random, "_set_cuda_rng_state", lambda *a, **k: None)
    # 2. (RNG tracker) is handled in parallel.py, which seeds megatron's tracker without CUDA generators;
    # 3./5. (causal mask, CP) need no patch: megarope's own core attention builds neither on CUDA.


def restore() -> None:
    """Undo :func:`apply` (the next apply() patches again)."""
    global _applied
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()
    _applied = False

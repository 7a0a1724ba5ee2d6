"""The few fixes megatron-core 0.19 needs to run on a CPU (gloo), applied once.

megatron-core assumes CUDA in a handful of places (see docs/platform notes in the README).
Each fix below is narrow, does nothing when CUDA is present, and is the only place in megarope
that knows it may be running without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

_applied = False

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


def apply() -> None:
    """Patch megatron-core's CUDA assumptions when no GPU is present. Idempotent."""
    import torch

    global _applied
    if _applied or torch.cuda.is_available():
        return
    _applied = True
    # 1. Buffers and rotary tables are put on torch.cuda.current_device(): make that the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # 6. dist_checkpointing syncs the GPU before and after saving.
    torch.cuda.synchronize = lambda *a, **k: None
    # 10. DDP's gradient sync orders its buckets on the current CUDA stream.
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # 2. (RNG) is handled in parallel.py, which seeds megatron's tracker without CUDA generators;
    # 3./5. (causal mask, CP) need no patch: megarope's own core attention builds neither on CUDA.

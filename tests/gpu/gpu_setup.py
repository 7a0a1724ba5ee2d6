"""What the GPU tests share: which devices and libraries there are, and the training runs they make."""

import importlib.util
import json
import os

import pytest
import torch

from megarope import compat

CUDA = compat.uses_cuda()
TE = CUDA and importlib.util.find_spec("transformer_engine") is not None
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9  # H100/H200: FP8, but no MXFP8
DRY = os.environ.get("MEGAROPE_GPU_DRY") == "1"
BACKEND = "te" if TE else "local"  # where TE is missing, the tests that need none run with the local backend
DTYPE = "bf16" if CUDA else "fp32"  # what training uses here

needs_te = pytest.mark.skipif(not TE, reason="needs a CUDA GPU and Transformer Engine")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def train_config(root: str, data_dir: str, *, backend: str = BACKEND, dtype: str = DTYPE, fp8: str | None = None,
                 fp8_recipe: str = "tensorwise", steps: int = 4, exit_at_step: int | None = None,
                 seq_len: int | None = None, micro_batch: int = 4) -> dict:
    """A few steps of the toy preset: 2 micro batches per step, lr high enough that each step moves the loss."""
    seq = seq_len or (256 if CUDA else 64)
    return {"model": {"preset": "toy", "backend": backend},
            "train": {"steps": steps, "exit_at_step": exit_at_step, "seq_len": seq, "global_batch": 2 * micro_batch,
                      "micro_batch": micro_batch, "lr": 3e-3, "warmup_steps": 0, "seed": 11, "dtype": dtype, "fp8": fp8,
                      "fp8_recipe": fp8_recipe},
            "data": {"path": "auto:toy", "prepare_dir": data_dir},
            "checkpoint": {"dir": root, "every": 0, "keep": 2},
            "log": {"tensorboard": False}}


def step_losses(checkpoint_dir: str) -> dict[int, float]:
    """step -> loss from the run's metrics.jsonl (a resumed run's lines continue the first run's)."""
    losses = {}
    with open(os.path.join(checkpoint_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            losses[record["step"]] = record["loss"]
    return losses

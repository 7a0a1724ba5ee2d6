"""What a training run reports each step: metrics.jsonl (one JSON line a step, cut back to the resumed step so
that a resume never repeats a line), TensorBoard, a progress bar, and MFU from the FLOPs a token costs.
train.Trainer writes them through MetricsWriter, on rank 0. (The evaluator's metrics are megarope.eval.metrics.)
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from typing import TYPE_CHECKING

from megarope import config as configuration, parallel
from megarope.files import atomic_files

if TYPE_CHECKING:
    from megarope.train import StepResult, TrainState

METRICS = "metrics.jsonl"
# Dense bf16 peaks (TFLOP/s) for MFU; log.peak_tflops overrides, other devices show no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def truncate_metrics(path: str, step: int) -> None:
    """Drop the lines of steps after ``step`` (written after the checkpoint we resume from)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    with atomic_files([path]) as (tmp,), open(tmp, "w") as f:
        f.writelines(kept)


def flops_per_token(preset, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (weights touched per token) + causal attention scores."""
    h, layers = preset.hidden_size, preset.num_layers
    kv = preset.num_query_groups * preset.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * preset.ffn_hidden_size
    weights = layers * per_layer + h * preset.padded_vocab_size  # output layer; input embedding is a lookup
    return 6.0 * weights + 6.0 * layers * seq_len * h


def peak_flops(cfg: configuration.Config, dtype: str) -> float | None:
    if cfg.log.peak_tflops:
        return cfg.log.peak_tflops * 1e12
    if not torch.cuda.is_available() or dtype != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((peak * 1e12 for key, peak in PEAK_TFLOPS.items() if key in name), None)


class MetricsWriter:
    """Each step's metrics: metrics.jsonl, TensorBoard, a progress bar (or a line every log.every steps
    without a terminal), MFU where the accelerator's peak is known. Rank 0 writes; the others do nothing."""

    def __init__(self, cfg: configuration.Config, root: str, first_step: int, flops_per_step: float,
                 peak_flops: float | None, world: int, progress: bool | None):
        self.cfg, self.flops_per_step, self.peak, self.world = cfg, flops_per_step, peak_flops, world
        self.path = os.path.join(root, METRICS)
        self.main = parallel.is_main()
        self.show_bar = self.main and (progress if progress is not None else sys.stderr.isatty())
        self.first_step = first_step
        self.file = self.tensorboard = self.bar = None

    def __enter__(self):
        from tqdm import tqdm

        if self.main:
            truncate_metrics(self.path, self.first_step)
            self.file = open(self.path, "a")
            if self.cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # lazy: TensorBoard takes seconds to import

                self.tensorboard = SummaryWriter(os.path.join(os.path.dirname(self.path), "tensorboard"),
                                                 purge_step=self.first_step + 1)
        self.bar = tqdm(total=self.cfg.train.steps, initial=self.first_step, desc="train", unit="step",
                        disable=not self.show_bar, dynamic_ncols=True)
        return self

    def write(self, state: TrainState, result: StepResult) -> None:
        if not self.main:
            return
        t = self.cfg.train
        record = {"step": state.step, "loss": finite_or_none(result.loss), "lr": result.lr,
                  "grad_norm": finite_or_none(result.grad_norm), "skipped": not result.updated,
                  "consumed_samples": state.consumed_samples, "tokens": state.consumed_samples * t.seq_len,
                  "tokens_per_s": t.global_batch * t.seq_len / result.seconds, "step_time_s": result.seconds}
        if self.peak:
            record["mfu"] = self.flops_per_step / result.seconds / self.world / self.peak
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], state.step)
        loss_text = "nan" if result.loss is None else f"{result.loss:.4f}"
        postfix = {"loss": loss_text, "lr": f"{result.lr:.2e}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
        if "mfu" in record:
            postfix["MFU"] = f"{record['mfu']:.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        if not self.show_bar and (state.step % self.cfg.log.every == 0 or state.step == t.steps):
            print(f"step {state.step}/{t.steps}  " + "  ".join(f"{k} {v}" for k, v in postfix.items())
                  + ("  (skipped: loss not finite)" if not result.updated else ""), flush=True)

    def __exit__(self, *exc):
        self.bar.close()
        for handle in (self.file, self.tensorboard):
            if handle is not None:
                handle.close()

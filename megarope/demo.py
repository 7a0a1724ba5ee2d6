"""`megarope demo`: the paper's central result, reproduced by megarope's own stack on a CPU.

The demo is `megarope experiment` (megarope.experiment) with a toy-sized config, ``config()``:

1. Data every machine has: the Python standard library's source, as byte tokens (vocab 256 +
   EOD). Bytes rather than a trained sentencepiece model: nothing to train or ship, lengths read
   directly as characters, and it is the setting the toy-scale measurement used. 20 held-out
   files of >= 8 KB are the evaluation documents (data.corpus stdlib-files).
2. Pretrain the toy LLaMA (4 layers, head dim 32, ~0.84M parameters) at length 128 with base 10000.
3. Continue from that checkpoint at length 128 with base 1e6 (above beta_0: a hard bound is
   predicted), 10 (below beta_3 = 20.4: no hard bound, smooth degradation) and 10000 (the control:
   the bound is the tuning length).
4. Evaluate each continued model at 128, 256, ... 8K tokens (one read of each document: causal
   attention makes the shorter lengths prefixes of it), and put the scaling law's predicted bound
   next to the measured break point (megarope.eval.metrics.measured_break).

Each training stage is a checkpoint directory under --out. A rerun reuses a stage only if its
checkpoint is complete and was trained with the same settings from the same starting checkpoint,
resumes one that was stopped, and starts over one that was not; so a second `make demo` only
re-evaluates and reprints (eval.reuse is off: the evaluation takes seconds). SIGTERM or SIGINT stops
the whole demo: a training stage first saves at the end of its step (see Interrupted).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from megarope import experiment, experiment_config, scaling

BASES = (1e6, 10.0, 1e4)
PRETRAIN_BASE = 1e4
TRAIN_LEN = 128
EVAL_LEN = 8192


@dataclass(frozen=True)
class Budget:
    pretrain_steps: int
    tune_steps: int
    eval_docs: int
    eval_len: int = EVAL_LEN


FULL = Budget(pretrain_steps=3000, tune_steps=1000, eval_docs=20)
QUICK = Budget(pretrain_steps=1000, tune_steps=300, eval_docs=8)

Interrupted = experiment.Interrupted
_StopSignals = experiment.StageSignals
_stage = experiment.train_stage


def _section(steps: int, lr: float) -> dict:
    """The training settings of a demo stage: a tiny model from scratch takes a large rate."""
    return {"steps": steps, "seq_len": TRAIN_LEN, "global_batch": 16, "micro_batch": 16, "lr": lr, "min_lr": lr / 10,
            "warmup_steps": min(100, steps // 10), "weight_decay": 0.1, "clip_grad": 1.0, "seed": 1234}


def config(out: str = "runs/demo", quick: bool = False, budget: Budget | None = None) -> dict:
    """The demo as an experiment config. The quick demo goes to out/quick and shares out/data."""
    budget = budget or (QUICK if quick else FULL)
    data_dir = os.path.join(out, "data")
    return {"out": os.path.join(out, "quick") if quick else out,
            "model": {"preset": "toy", "backend": "local", "tokenizer": "bytes"},
            "pretrain": {"base": PRETRAIN_BASE, **_section(budget.pretrain_steps, 2e-3)},
            "tune": {"bases": list(BASES), **_section(budget.tune_steps, 1e-3)},
            "data": {"corpus": "stdlib-files", "dir": data_dir},
            "eval": {"lengths": [TRAIN_LEN * 2**k for k in range(int(math.log2(budget.eval_len // TRAIN_LEN)) + 1)],
                     "docs": budget.eval_docs, "bucket0": TRAIN_LEN, "positions": True, "reuse": False},
            "checkpoint": {"every": 0, "keep": 1},
            "log": {"tensorboard": False, "every": 50}}


def _train_config(out: str, name: str, base: float, steps: int, lr: float, data_prefix: str, init_from: str | None):
    """The `megarope train` config of one demo stage (experiment.train_config of the demo's config)."""
    return experiment.train_config(experiment_config.validate(config(out)), name, base, _section(steps, lr), data_prefix,
                                   init_from)


def predicted_bound(base: float) -> float | None:
    """Theorem 3 for the toy model: head dim 32, pretrained and tuned at length 128."""
    return scaling.plan_base(32, TRAIN_LEN, base, TRAIN_LEN, PRETRAIN_BASE).extrapolation_bound


def run(out: str = "runs/demo", quick: bool = False, budget: Budget | None = None) -> list[dict]:
    """The whole demo; returns the summary ({base, predicted_bound, measured_break} per base).

    ``budget`` shrinks it further (the test suite runs a seconds-scale version). Raises Interrupted
    when SIGTERM or SIGINT stops it (in the main thread; elsewhere signals are left alone).
    """
    return experiment.run(config(out, quick, budget))

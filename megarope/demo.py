"""`megarope demo`: the paper's central result, reproduced by megarope's own stack on a CPU.

1. Data every machine has: the Python standard library's source, as byte tokens (vocab 256 +
   EOD). Bytes rather than a trained sentencepiece model: nothing to train or ship, lengths read
   directly as characters, and it is the setting the toy-scale measurement used. 20 held-out
   files of >= 8 KB are the evaluation documents.
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
re-evaluates and reprints. SIGTERM or SIGINT stops the whole demo: a training stage first saves at
the end of its step (see Interrupted).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass

from megarope import scaling
from megarope.signals import Stopped
from megarope.files import write_json_atomic
from megarope.trust import OWN
from megarope.units import format_tokens

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


def _train_config(out: str, name: str, base: float, steps: int, lr: float, data_prefix: str, init_from: str | None):
    return {
        "model": {"preset": "toy", "backend": "local"},
        "rope": {"base": base, "train_len": TRAIN_LEN},
        "train": {"steps": steps, "seq_len": TRAIN_LEN, "global_batch": 16, "micro_batch": 16, "lr": lr,
                  "min_lr": lr / 10, "warmup_steps": min(100, steps // 10), "weight_decay": 0.1, "clip_grad": 1.0,
                  "seed": 1234},
        "data": {"path": data_prefix, "tokenizer": "bytes"},
        "init": {"from": init_from, "trust": "own"},  # an earlier stage of this demo, under its own --out
        "checkpoint": {"dir": os.path.join(out, name), "every": 0, "keep": 1},
        "log": {"tensorboard": False, "every": 50},
    }


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the demo. Finished stages are kept; a rerun resumes the stopped one."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; run it again to resume")


class _StopSignals:
    """SIGTERM and SIGINT for the whole demo.

    While a training stage is in its step loop, train's own SIGTERM handler is installed: the stage
    saves at the end of its step and returns, stopped by the signal; a SIGINT is passed on to it as a
    SIGTERM. The evaluation has handlers of its own: it stops before its next batch, keeping the results
    it wrote. Anywhere else nothing is half-done that a save could keep (files are written atomically),
    so a signal raises Interrupted at once, and so does a second one during a stage's save.
    """

    def __init__(self):
        self.received: int | None = None
        self.where = "before its first stage"
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._handler = self._handle  # one bound method, so that getsignal can recognise it
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame):
        first = self.received is None
        self.received = self.received or signum
        if first and signal.getsignal(signal.SIGTERM) is not self._handler:  # a stage's step loop has SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Interrupted(signum, self.where)


def _comparable(cfg: dict) -> dict:
    """What decides a stage's result: the model, RoPE and training settings, and the checkpoint it
    starts from (by real path, so a stage trained from another pretraining checkpoint never matches)."""
    start = cfg["init"]["from"]
    return {**{key: cfg[key] for key in ("model", "rope", "train")},
            "init": os.path.realpath(start) if start else None}


def _stage(label: str, cfg: dict, signals: _StopSignals) -> str:
    """Train one stage unless its checkpoint directory already holds it finished; returns its checkpoint."""
    from megarope import checkpoint, config as configuration, parallel, train

    root, steps = cfg["checkpoint"]["dir"], cfg["train"]["steps"]
    found = checkpoint.latest_checkpoint(root)
    start = f"training {steps} steps"
    if found:
        saved = checkpoint.read_train_state(found)
        if _comparable(saved["config"]) != _comparable(configuration.validate(cfg).to_dict()):
            print(f"[{label}] {root} was trained with other settings or from another checkpoint: starting over",
                  flush=True)
            shutil.rmtree(root)
        elif saved["step"] >= steps:
            print(f"[{label}] cached: {found}", flush=True)
            return found
        else:
            start = f"resuming at step {saved['step']} of {steps}"
    started = time.perf_counter()
    signals.where = f"in stage {label}"
    print(f"[{label}] {start}, base {cfg['rope']['base']:g}", flush=True)
    try:
        summary = train.run(cfg)  # a progress bar on a terminal, periodic lines in a log
    finally:
        parallel.destroy()
    if summary["stopped"]:
        raise Interrupted(signals.received or signal.SIGTERM,
                          f"in stage {label} after step {summary['step']} of {steps} (saved {summary['checkpoint']})")
    print(f"[{label}] done in {time.perf_counter() - started:.0f} s, loss {summary['loss']:.3f}", flush=True)
    return summary["checkpoint"]


def predicted_bound(base: float) -> float | None:
    """Theorem 3 for the toy model: head dim 32, pretrained and tuned at length 128."""
    return scaling.plan_base(32, TRAIN_LEN, base, TRAIN_LEN, PRETRAIN_BASE).extrapolation_bound


def run(out: str = "runs/demo", quick: bool = False, budget: Budget | None = None) -> list[dict]:
    """The whole demo; returns the summary ({base, predicted_bound, measured_break} per base).

    ``budget`` shrinks it further (the test suite runs a seconds-scale version). Raises Interrupted
    when SIGTERM or SIGINT stops it (in the main thread; elsewhere signals are left alone).
    """
    with _StopSignals() as signals:
        return _run(out, quick, budget, signals)


def _run(out: str, quick: bool, budget: Budget | None, signals: _StopSignals) -> list[dict]:
    from megarope import data
    from megarope.eval import metrics, perplexity

    budget = budget or (QUICK if quick else FULL)
    data_dir = os.path.join(out, "data")  # shared by the full and the quick demo
    out = os.path.join(out, "quick") if quick else out
    timings = {}
    started = time.perf_counter()

    t = time.perf_counter()
    signals.where = "while preparing the data"
    prefix = data.prepare_toy_data(data_dir)
    _, eval_path = data.stdlib_corpus(data_dir)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    pretrained = _stage("pretrain", _train_config(out, "pretrain", PRETRAIN_BASE, budget.pretrain_steps, 2e-3,
                                                  prefix, None), signals)
    timings["pretrain"] = time.perf_counter() - t
    tuned = {}
    for base in BASES:
        t = time.perf_counter()
        name = f"base-{base:g}"
        tuned[base] = _stage(name, _train_config(out, name, base, budget.tune_steps, 1e-3, prefix, pretrained),
                             signals)
        timings[name] = time.perf_counter() - t

    t = time.perf_counter()
    signals.where = "in stage eval (the trained stages are kept)"
    eval_len = budget.eval_len
    print(f"[eval] {len(BASES)} models up to {eval_len} tokens on {budget.eval_docs} held-out files", flush=True)
    lengths = [TRAIN_LEN * 2**k for k in range(int(math.log2(eval_len // TRAIN_LEN)) + 1)]
    try:  # the evaluation handles SIGTERM and SIGINT itself: it stops before its next batch
        records = perplexity.run([tuned[b] for b in BASES], [eval_path], lengths, out_dir=out,
                                 max_docs=budget.eval_docs, bucket0=TRAIN_LEN, positions=True, trust=OWN,
                                 verbose=False)
    except Stopped as e:
        raise Interrupted(getattr(signal, e.signal or "SIGTERM"), signals.where) from None
    timings["eval"] = time.perf_counter() - t
    print(f"[eval] done in {timings['eval']:.0f} s", flush=True)

    longest = [r for r in records if r["length"] == eval_len]  # one per base, in BASES order
    summary = [{"base": base, "predicted_bound": predicted_bound(base),
                "measured_break": metrics.measured_break(rec["position_loss"], TRAIN_LEN)}
               for base, rec in zip(BASES, longest)]
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    timings["total"] = time.perf_counter() - started
    print()
    print(format_report(longest, summary, timings))
    print(f"\nwritten: {out}/results.json, summary.json, ppl_vs_length.png, loss_by_position.png")
    return summary


def format_report(records: list[dict], summary: list[dict], timings: dict) -> str:
    buckets = records[0]["buckets"]
    head = "mean loss (nats/byte) by position"
    cols = [f"{b['start']}-{b['end']}" for b in buckets]
    lines = [head, f"{'model':<12}" + "".join(f"{c:>11}" for c in cols)]
    for s, rec in zip(summary, records):
        lines.append(f"{'base ' + format(s['base'], 'g'):<12}" + "".join(f"{b['loss']:>11.3f}" for b in rec["buckets"]))
    lines += ["", f"{'base':>8}  {'predicted bound':>16}  {'measured break':>15}"]
    for s in summary:
        lines.append(f"{s['base']:>8g}  {format_tokens(s['predicted_bound']):>16}  {format_tokens(s['measured_break']):>15}")
    lines += ["", "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())]
    return "\n".join(lines)

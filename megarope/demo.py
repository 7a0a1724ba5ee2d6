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

Each phase is a checkpoint directory under --out; a rerun skips every phase whose checkpoint is
complete, so a second `make demo` only re-evaluates and reprints.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from megarope import scaling
from megarope.files import write_json_atomic
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
        "init": {"from": init_from},
        "checkpoint": {"dir": os.path.join(out, name), "every": 0, "keep": 1},
        "log": {"tensorboard": False, "every": 50},
    }


def _train_phase(label: str, cfg: dict) -> str:
    """Train unless the checkpoint directory already holds the finished run; returns its checkpoint."""
    from megarope import checkpoint, parallel, train

    done = checkpoint.latest_checkpoint(cfg["checkpoint"]["dir"])
    if done and checkpoint.read_train_state(done)["step"] >= cfg["train"]["steps"]:
        print(f"[{label}] cached: {done}", flush=True)
        return done
    started = time.perf_counter()
    print(f"[{label}] training {cfg['train']['steps']} steps, base {cfg['rope']['base']:g}", flush=True)
    try:
        summary = train.run(cfg, progress=True)
    finally:
        parallel.destroy()
    print(f"[{label}] done in {time.perf_counter() - started:.0f} s, loss {summary['loss']:.3f}", flush=True)
    return summary["checkpoint"]


def predicted_bound(base: float) -> float | None:
    """Theorem 3 for the toy model: head dim 32, pretrained and tuned at length 128."""
    return scaling.plan_base(32, TRAIN_LEN, base, TRAIN_LEN, PRETRAIN_BASE).extrapolation_bound


def run(out: str = "runs/demo", quick: bool = False, budget: Budget | None = None, eval_len: int = EVAL_LEN) -> list[dict]:
    """The whole demo; returns the summary ({base, predicted_bound, measured_break} per base).

    ``budget`` and ``eval_len`` shrink it further (the test suite runs a seconds-scale version).
    """
    from megarope import data
    from megarope.eval import metrics, perplexity

    budget = budget or (QUICK if quick else FULL)
    data_dir = os.path.join(out, "data")  # shared by the full and the quick demo
    out = os.path.join(out, "quick") if quick else out
    timings = {}
    started = time.perf_counter()

    t = time.perf_counter()
    prefix = data.prepare_toy_data(data_dir)
    _, eval_path = data.stdlib_corpus(data_dir)
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    pretrained = _train_phase("pretrain", _train_config(out, "pretrain", PRETRAIN_BASE, budget.pretrain_steps, 2e-3,
                                                        prefix, None))
    timings["pretrain"] = time.perf_counter() - t
    tuned = {}
    for base in BASES:
        t = time.perf_counter()
        name = f"base-{base:g}"
        tuned[base] = _train_phase(name, _train_config(out, name, base, budget.tune_steps, 1e-3, prefix, pretrained))
        timings[name] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[eval] {len(BASES)} models up to {eval_len} tokens on {budget.eval_docs} held-out files", flush=True)
    lengths = [TRAIN_LEN * 2**k for k in range(int(math.log2(eval_len // TRAIN_LEN)) + 1)]
    records = perplexity.run([tuned[b] for b in BASES], [eval_path], lengths, out_dir=out,
                             max_docs=budget.eval_docs, bucket0=TRAIN_LEN, positions=True, verbose=False)
    timings["eval"] = time.perf_counter() - t

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

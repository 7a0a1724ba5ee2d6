"""megarope eval's scorer against transformers on the same LLaMA-style model and the same tokens, CPU, one run.

    .venv/bin/python benchmarks/eval_vs_transformers.py                    # 2K-32K tokens, 3 repeats
    .venv/bin/python benchmarks/eval_vs_transformers.py --lengths 2K,4K --repeats 5 --json out.json

What a user would otherwise pick: transformers' LlamaForCausalLM with SDPA attention and
``labels=input_ids`` (its mean next-token loss), against ``megarope eval``'s scorer
(eval.scoring.score_sequences, the call `eval` makes, on the model converted in memory from the same HF
directory by convert.load_hf). The model: a random LLaMA (2 layers, hidden 256, 4 heads of 64, FFN 688,
vocab 32000, fp32), saved once as an HF directory; the tokens: one random sequence, each length its prefix.
Both sides score the L-1 predictions of one sequence of L tokens; their mean losses must agree to 1e-4
relative (the run fails otherwise). transformers runs with use_cache=False (no K/V cache to keep).

Each side lives in one child process for the whole run (it loads its model once and warms up on 256
tokens), and the parent asks them in turn: for every length, ``--repeats`` pairs, the order within a pair
alternating, so that the machine's load falls on both sides alike. A measurement resets the kernel's
peak-RSS counter (peak_memory.reset: VmHWM := VmRSS) and scores the sequence once under
torch.inference_mode: "peak" is VmHWM minus the RSS at the reset, what the scoring itself added at its widest
moment, without the interpreter, the libraries or the weights. The children run with
MALLOC_MMAP_THRESHOLD_=131072 so that the peak RSS follows the live memory (see eval_scaling.py). A side's
first call at a length is reported apart from the rest; the speed ratio is the median over the pairs after
it of megarope's tokens/s over transformers' in the same pair. The load average is printed at the start and
the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import peak_memory  # benchmarks/, this script's folder
from megarope.units import format_tokens, parse_tokens

VOCAB, MAX_LEN, WARMUP = 32000, 32768, 256
CONFIG = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": MAX_LEN, "rope_theta": 10000.0,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SIDES = ("megarope", "transformers")


def make_model(hf_dir: str) -> None:
    """A random LLaMA saved as an HF directory, weights large enough that the loss is far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    model.save_pretrained(hf_dir, safe_serialization=True)
    torch.save(torch.randint(0, VOCAB, (MAX_LEN,), generator=torch.Generator().manual_seed(1)),
               os.path.join(hf_dir, "ids.pt"))


def load_megarope(hf_dir: str):
    from megarope import convert, parallel

    parallel.init()
    model, _ = convert.load_hf(hf_dir, dtype=torch.float32)

    def score(ids):
        from megarope.eval import scoring

        loss, _ = scoring.score_sequences(model, ids[None])
        return loss.double().mean().item()

    return score


def load_transformers(hf_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32).eval()

    def score(ids):
        with torch.inference_mode():
            return model(input_ids=ids[None], labels=ids[None], use_cache=False).loss.item()

    return score


def serve(side: str, hf_dir: str) -> None:
    """The child: load, warm up, then score the length each stdin line names; one JSON line back for each."""
    ids = torch.load(os.path.join(hf_dir, "ids.pt"))
    score = {"megarope": load_megarope, "transformers": load_transformers}[side](hf_dir)
    score(ids[:WARMUP])
    print(json.dumps({"ready": side}), flush=True)
    for line in sys.stdin:
        length = int(line)
        base_kb = peak_memory.reset()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        loss = score(ids[:length])
        seconds, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        print(json.dumps({"side": side, "length": length, "loss": loss, "seconds": seconds, "cpu_seconds": cpu,
                          "tokens_per_s": length / seconds, "peak_mib": peak_memory.added_mib(base_kb)}), flush=True)


class Side:
    """One side's child process."""

    def __init__(self, side: str, hf_dir: str):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", side, "--hf", hf_dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=peak_memory.REPO)
        self.side = side
        self._read()

    def _read(self) -> dict:
        """The child's next JSON line (the libraries may print other lines)."""
        while line := self.proc.stdout.readline():
            if line.startswith("{"):
                return json.loads(line)
        raise SystemExit(f"the {self.side} child stopped (exit {self.proc.wait()})")

    def score(self, length: int) -> dict:
        self.proc.stdin.write(f"{length}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def summarize(length: int, runs: dict[str, list[dict]]) -> dict:
    """First calls apart; the rest as medians, and the median of the per-pair speed ratios."""
    first = {side: runs[side][0] for side in SIDES}
    warm = {side: runs[side][1:] or runs[side] for side in SIDES}
    pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(warm["megarope"], warm["transformers"])]
    median = {side: {key: statistics.median(r[key] for r in warm[side])
                     for key in ("seconds", "cpu_seconds", "tokens_per_s", "peak_mib")} for side in SIDES}
    mine, theirs = runs["megarope"][0]["loss"], runs["transformers"][0]["loss"]
    return {"length": length, "loss": {"megarope": mine, "transformers": theirs},
            "loss_rel_diff": abs(mine - theirs) / abs(theirs), "first_seconds": {s: first[s]["seconds"] for s in SIDES},
            "median": median, "speed_ratio": statistics.median(pairs), "speed_ratio_range": [min(pairs), max(pairs)],
            "cpu_time_ratio": median["transformers"]["cpu_seconds"] / median["megarope"]["cpu_seconds"],
            "memory_ratio": median["transformers"]["peak_mib"] / median["megarope"]["peak_mib"],
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2K,4K,8K,16K,32K")
    ap.add_argument("--repeats", type=int, default=3, help="pairs per length after the first (default 3)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--serve", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.hf)
        return
    lengths = [parse_tokens(x) for x in args.lengths.split(",")]
    if max(lengths) > MAX_LEN:
        raise SystemExit(f"lengths up to {MAX_LEN}")
    print(f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"fp32, MALLOC_MMAP_THRESHOLD_=131072; model {CONFIG}")
    print(f"load average at the start: {load_average()}", flush=True)
    started, rows = time.monotonic(), []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "llama")
        make_model(hf_dir)
        sides = {side: Side(side, hf_dir) for side in SIDES}
        try:
            print(f"{'length':>7} {'side':>12} {'loss':>10} {'first s':>8} {'s':>7} {'CPU s':>7} {'tok/s':>8} "
                  f"{'peak MiB':>9}")
            for length in lengths:
                runs = {side: [] for side in SIDES}
                for r in range(args.repeats + 1):
                    for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                        runs[side].append(sides[side].score(length))
                row = summarize(length, runs)
                rows.append(row)
                for side in SIDES:
                    m = row["median"][side]
                    print(f"{format_tokens(length):>7} {side:>12} {row['loss'][side]:>10.6f} "
                          f"{row['first_seconds'][side]:>8.2f} {m['seconds']:>7.2f} {m['cpu_seconds']:>7.2f} "
                          f"{m['tokens_per_s']:>8.0f} {m['peak_mib']:>9.1f}")
                low, high = row["speed_ratio_range"]
                print(f"{'':>7} {'ratio':>12} loss rel diff {row['loss_rel_diff']:.1e}; megarope {row['speed_ratio']:.2f}x "
                      f"the speed ({low:.2f}-{high:.2f} over {args.repeats} pairs; CPU-time ratio "
                      f"{row['cpu_time_ratio']:.2f}), transformers {row['memory_ratio']:.1f}x the peak memory; "
                      f"load {load_average()}", flush=True)
                if row["loss_rel_diff"] > 1e-4:
                    raise SystemExit(f"losses differ at {length}: {row['loss']}")
        finally:
            for side in sides.values():
                side.close()
    print(f"load average at the end: {load_average()}; {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Evaluation throughput and peak memory against sequence length (evaluate.score_sequences), toy model, CPU.

    .venv/bin/python benchmarks/eval_scaling.py                      # 1K .. 64K, fp32, CP=1
    .venv/bin/python benchmarks/eval_scaling.py --lengths 1K,4K --json out.json

Each length runs in a fresh child process, which builds the model (random init: speed and memory do not
depend on the weights), warms up on a short sequence, then resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs`` zeroes VmHWM) and scores one sequence. "peak" is VmHWM minus the RSS
at the reset: the memory the evaluation itself added at its widest moment (activations, the K/V, loss
chunks), without the interpreter, torch, megatron or the weights. Why this and not something lighter:
tracemalloc does not see torch's C++ allocations, torch.profiler's memory view follows the allocator's
events, not what the process holds, and ru_maxrss of one long-lived process only ever grows (a peak
from model building or an earlier length would hide the later ones) -- a child per length with the
counter reset right before the measured call has none of these problems.

glibc's malloc: by default it moves its mmap threshold up (to 32 MB) after the first large frees, so
later tensors come from the heap, and freed heap pages stay in the RSS (fragmentation): the peak RSS then
grows faster than the live memory. The children therefore run with MALLOC_MMAP_THRESHOLD_=131072 (every
tensor over 128 KiB is its own mapping, returned to the system when freed), so that VmHWM follows the live
memory; ``--default-malloc`` measures with glibc's defaults instead (what a plain run's RSS shows).

Next to each measurement: evaluate.estimate_eval_memory's activation part (its peak minus the weights),
to check the estimator at toy scale. Timing is one call (a 64K sequence takes most of a minute on two
cores); the attention is O(L^2) in compute, so tokens/s falls with length while memory stays linear.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from megarope.units import parse_tokens

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_LENGTHS = "1K,2K,4K,8K,16K,32K,64K"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(length: int, dtype_name: str, threads: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    from megarope import evaluate, parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    parallel.init()
    preset = get_preset("toy", max_seq_len=length)
    model = build_model(preset, RopeConfig(base=10000, train_len=preset.max_seq_len), dtype=dtype)
    tokens = torch.randint(0, preset.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    evaluate.score_sequences(model, tokens[:, :1024])  # warm-up: kernels, thread pools, allocator
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    loss, _ = evaluate.score_sequences(model, tokens)
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") - base_kb
    est = evaluate.estimate_eval_memory(preset, length, dtype_bytes=torch.finfo(dtype).bits // 8)
    parallel.destroy()
    return {"length": length, "seconds": seconds, "tokens_per_s": length / seconds, "peak_mib": peak_kb / 1024,
            "estimate_mib": (est["peak"] - est["weights"]) / 2**20, "loss": float(loss.mean()), "dtype": dtype_name,
            "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS,
                        help=f"comma-separated, K/M suffixes (default {DEFAULT_LENGTHS})")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's adaptive mmap threshold (peak RSS then includes heap fragmentation)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.threads)))
        return

    rows = []
    env = dict(os.environ)
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    print(f"toy model, {args.dtype}, {args.threads} threads, CP=1, "
          f"{'default malloc' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=131072'}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'length':>8}  {'seconds':>8}  {'tokens/s':>9}  {'peak MiB':>9}  {'x prev':>6}  {'estimate MiB':>12}")
    for length in [parse_tokens(t) for t in args.lengths.split(",") if t.strip()]:
        command = [sys.executable, os.path.abspath(__file__), "--child", str(length), "--dtype", args.dtype,
                   "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, cwd=os.path.dirname(HERE), env=env)
        if out.returncode:
            sys.exit(f"length {length} failed:\n{out.stderr}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = row["peak_mib"] / rows[-1]["peak_mib"] if rows else float("nan")
        rows.append(row)
        print(f"{length:>8}  {row['seconds']:>8.2f}  {row['tokens_per_s']:>9.0f}  {row['peak_mib']:>9.1f}  "
              f"{ratio:>6.2f}  {row['estimate_mib']:>12.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

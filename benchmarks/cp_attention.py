"""The context-parallel attention alone: all-gather of K/V against the ring, time and peak memory per rank.

    .venv/bin/python benchmarks/cp_attention.py                        # CP 2, 4, 8; 4096 tokens per rank
    .venv/bin/python benchmarks/cp_attention.py --cp 2,4 --tokens-per-rank 8192 --backward

For each CP size, CP gloo processes (one thread each) run megarope.attention.context_parallel_attention on
their share of one sequence (toy-model heads by default: 4 query heads, 2 K/V heads of 32), alternating
the two ways of passing K/V, ``--repeats`` times each; reported: the median wall time of a call (the
slowest rank's), its CPU time, and the peak memory a call added on the widest rank (VmHWM after
``clear_refs``, with glibc's mmap threshold pinned as in eval_scaling.py). The sequence grows with CP
(tokens per rank fixed), as when CP is raised to reach a longer context.

What this can and cannot say: on a machine with fewer cores than ranks the processes share the cores,
so the ring's overlap of sending with computing cannot show; what shows is the cost of each scheme's
communication and of its kernel calls (the all-gather makes at most 5 per layer, the ring CP). The
crossover on GPUs (NCCL, NVLink) has to be measured there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

import peak_memory  # benchmarks/, this script's folder
from megarope import attention

COMMS = ("all-gather", "ring")


def child(args) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = args.tokens_per_rank
    q = torch.randn(tokens, 1, args.heads, args.head_dim, generator=g)
    k, v = (torch.randn(tokens, 1, args.kv_heads, args.head_dim, generator=g) for _ in range(2))
    scale = args.head_dim ** -0.5
    leaves = [t.requires_grad_(args.backward) for t in (q, k, v)]

    def call(comm):
        out = attention.context_parallel_attention(*leaves, group, scale, comm)
        if args.backward:
            out.sum().backward()

    results = {comm: {"seconds": [], "cpu_seconds": [], "peak_mib": []} for comm in COMMS}
    for comm in COMMS:
        call(comm)  # warm-up
    for _ in range(args.repeats):
        for comm in COMMS:
            dist.barrier()
            base = peak_memory.reset()
            start, cpu = time.perf_counter(), time.process_time()
            call(comm)
            results[comm]["cpu_seconds"].append(time.process_time() - cpu)
            results[comm]["peak_mib"].append(peak_memory.added_mib(base))
            dist.barrier()  # the call ends when the slowest rank is done
            results[comm]["seconds"].append(time.perf_counter() - start)
    dist.destroy_process_group()
    return results


def measure(cp: int, args, env: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--tokens-per-rank", str(args.tokens_per_rank),
               "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
               "--repeats", str(args.repeats)] + (["--backward"] if args.backward else [])
    ranks = peak_memory.run_children(command, env, ranks=cp, what=f"CP {cp}")
    row = {"cp": cp, "tokens": cp * args.tokens_per_rank}
    for comm in COMMS:
        row[comm] = {"seconds": statistics.median(ranks[0][comm]["seconds"]),
                     "cpu_seconds": max(statistics.median(r[comm]["cpu_seconds"]) for r in ranks),
                     "peak_mib": max(max(r[comm]["peak_mib"]) for r in ranks)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cp", default="2,4,8", help="CP sizes to measure (default 2,4,8)")
    parser.add_argument("--tokens-per-rank", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward + backward (training)")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    print(f"{'forward + backward' if args.backward else 'forward'}, {args.tokens_per_rank} tokens per rank, "
          f"{args.heads} heads / {args.kv_heads} K/V heads of {args.head_dim}, fp32, 1 thread per rank, median of "
          f"{args.repeats}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'CP':>3}  {'tokens':>7}  " + "  ".join(f"{c + ' s':>13}  {'CPU s':>6}  {'peak MiB':>8}" for c in COMMS)
          + f"  {'ring/all-gather':>15}")
    rows = []
    for cp in [int(c) for c in args.cp.split(",")]:
        row = measure(cp, args, env)
        rows.append(row)
        cells = "  ".join(f"{row[c]['seconds']:>13.3f}  {row[c]['cpu_seconds']:>6.3f}  {row[c]['peak_mib']:>8.1f}"
                          for c in COMMS)
        print(f"{cp:>3}  {row['tokens']:>7}  {cells}  {row['ring']['seconds'] / row['all-gather']['seconds']:>15.2f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

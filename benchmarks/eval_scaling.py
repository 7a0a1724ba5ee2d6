"""Evaluation throughput and peak memory against sequence length (eval.scoring.score_sequences), toy model, CPU.

    .venv/bin/python benchmarks/eval_scaling.py                      # CP=1: 1K .. 64K, fp32
    .venv/bin/python benchmarks/eval_scaling.py --cp 2               # CP=2 over gloo: 16K .. 128K, new vs old attention
    .venv/bin/python benchmarks/eval_scaling.py --lengths 1K,4K --json out.json

Each measurement runs in fresh child processes (``--cp 2``: two of them, a gloo group, one thread each),
which build the model (random init: speed and memory do not depend on the weights), warm up on a short
sequence, then reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` zeroes VmHWM) and
score one sequence. "peak" is VmHWM minus the RSS at the reset: the memory the evaluation itself added at
its widest moment (activations, K/V, loss chunks), without the interpreter, torch, megatron or the
weights; under CP it is the larger of the two ranks'. Why this and not something lighter: tracemalloc
does not see torch's C++ allocations, torch.profiler's memory view follows the allocator's events, not
what the process holds, and ru_maxrss of one long-lived process only ever grows (a peak from model
building or an earlier length would hide the later ones) -- a child per measurement with the counter
reset right before the measured call has none of these problems.

glibc's malloc: by default it moves its mmap threshold up (to 32 MB) after the first large frees, so
later tensors come from the heap, and freed heap pages stay in the RSS (fragmentation): the peak RSS then
grows faster than the live memory. The children therefore run with MALLOC_MMAP_THRESHOLD_=131072 (every
tensor over 128 KiB is its own mapping, returned to the system when freed), so that VmHWM follows the live
memory; ``--default-malloc`` measures with glibc's defaults instead (what a plain run's RSS shows).

With ``--cp 2`` every length is measured twice in the same run, alternating: with megarope's attention
("new": fused kernels over whole chunks, K/V passed as ``--cp-comm`` says) and with the mask-based
attention it replaced ("old", kept in this file only: K/V all-gathered, then queries in blocks of 1024
against the key prefix under a boolean [1024 x S] mask).

Next to each measurement: eval.memory.estimate_eval_memory's activation part (its peak minus the weights),
to check the estimator at toy scale. Timing is one call, as wall-clock seconds (tokens/s) and as the
process's CPU seconds ("CPU s", the slower rank's): on a machine shared with other work the wall clock
follows the load, while CPU time counts the work this process did. The attention is O(L^2) in compute,
so tokens/s falls with length while memory stays linear.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

import peak_memory  # benchmarks/, this script's folder
from megarope import attention as attention_mod
from megarope import parallel
from megarope.eval import memory, scoring
from megarope.model import build_model, get_preset
from megarope.parallel import cp_chunk_ids, cp_local_positions
from megarope.rope import RopeConfig
from megarope.units import format_tokens, parse_tokens

DEFAULT_LENGTHS = {1: "1K,2K,4K,8K,16K,32K,64K", 2: "16K,32K,64K,128K"}
OLD_QUERY_BLOCK = 1024


# ----------------------------------------------------------------------------------------------- the old attention
def _old_gather_sequence(x, group):
    """The replaced all-gather: a list of parts, concatenated, then put in natural order."""
    cp_size = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(cp_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    chunks = torch.cat(parts, dim=0).chunk(2 * cp_size, dim=0)
    owner = {chunk_id: 2 * rank + slot for rank in range(cp_size)
             for slot, chunk_id in enumerate(cp_chunk_ids(cp_size, rank))}
    return torch.cat([chunks[owner[c]] for c in range(2 * cp_size)], dim=0)


def _old_forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                 packed_seq_params=None, **_):
    """ContextParallelAttention.forward as it was: K/V all-gathered, masked query blocks (inference only)."""
    group = self.cp_group
    query = attention_mod.scale_queries(query, self.rope, group)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    k, v = (_old_gather_sequence(t.permute(2, 0, 1, 3), group).permute(1, 2, 0, 3) for t in (k, v))
    positions = cp_local_positions(k.shape[2], dist.get_world_size(group), dist.get_rank(group), q.device)
    out, key_pos = [], torch.arange(k.shape[2], device=q.device)
    for start in range(0, q.shape[2], OLD_QUERY_BLOCK):
        pos = positions[start:start + OLD_QUERY_BLOCK]
        end = int(pos.max()) + 1
        mask = key_pos[None, :end] <= pos[:, None]
        out.append(F.scaled_dot_product_attention(q[:, :, start:start + OLD_QUERY_BLOCK], k[:, :, :end],
                                                  v[:, :, :end], attn_mask=mask, scale=self.softmax_scale,
                                                  enable_gqa=True))
    out = torch.cat(out, dim=2)
    b, h, s, d = out.shape
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def use_old_attention(model) -> None:
    for module in model.modules():
        if isinstance(module, attention_mod.ContextParallelAttention):
            module.forward = types.MethodType(_old_forward, module)


# ----------------------------------------------------------------------------------------------- one measurement
def child(length: int, dtype_name: str, threads: int, cp: int, attention: str, cp_comm: str) -> dict:
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    parallel.init(cp=cp)
    preset = get_preset("toy", max_seq_len=length)
    model = build_model(preset, RopeConfig(base=10000, train_len=preset.max_seq_len), dtype=dtype)
    attention_mod.set_cp_comm(model, cp_comm)
    if attention == "old":
        use_old_attention(model)
    tokens = torch.randint(0, preset.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    scoring.score_sequences(model, tokens[:, :1024])  # warm-up: kernels, thread pools, allocator, the group
    if cp > 1:
        dist.barrier()
    base_kb = peak_memory.reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss, _ = scoring.score_sequences(model, tokens)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_kb = peak_memory.added_mib(base_kb) * 1024
    est = memory.estimate_eval_memory(preset, length, dtype_bytes=torch.finfo(dtype).bits // 8, cp=cp,
                                      cp_comm=cp_comm)
    parallel.destroy()
    return {"length": length, "cp": cp, "attention": attention, "cp_comm": cp_comm, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "tokens_per_s": length / seconds, "peak_mib": peak_kb / 1024,
            "estimate_mib": (est["peak"] - est["weights"]) / 2**20, "loss": float(loss.double().mean()),
            "dtype": dtype_name, "threads": threads}


def measure(length: int, args, attention: str, env: dict) -> dict:
    """One measurement in fresh child processes (CP of them); under CP, the larger peak of the ranks."""
    base = [sys.executable, os.path.abspath(__file__), "--child", str(length), "--dtype", args.dtype,
            "--threads", str(args.threads), "--cp", str(args.cp), "--attention", attention, "--cp-comm", args.cp_comm]
    rows = peak_memory.run_children(base, env, ranks=args.cp, what=f"length {length} ({attention})")
    row = max(rows, key=lambda r: r["peak_mib"])
    row["peak_mib_by_rank"] = [r["peak_mib"] for r in rows]
    row["seconds"] = max(r["seconds"] for r in rows)
    row["cpu_seconds"] = max(r["cpu_seconds"] for r in rows)
    row["tokens_per_s"] = length / row["seconds"]
    row["tokens_per_cpu_s"] = length / row["cpu_seconds"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cp", type=int, default=1, choices=(1, 2), help="context-parallel ranks (gloo processes)")
    parser.add_argument("--lengths", help=f"comma-separated, K/M suffixes (default {DEFAULT_LENGTHS})")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, help="threads per process (default: the cores, shared by the ranks)")
    parser.add_argument("--cp-comm", choices=("auto", "all-gather", "ring"), default="auto")
    parser.add_argument("--attention", choices=("new", "old", "both"), default=None,
                        help="CP only: which core attention (default both, alternating)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's adaptive mmap threshold (peak RSS then includes heap fragmentation)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.cp)
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.threads, args.cp, args.attention or "new",
                               args.cp_comm)))
        return

    attentions = ["new"] if args.cp == 1 else (["new", "old"] if args.attention in (None, "both") else [args.attention])
    env = dict(os.environ)
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    print(f"toy model, {args.dtype}, CP={args.cp}, {args.threads} thread(s) per rank, cp_comm {args.cp_comm}, "
          f"{'default malloc' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=131072'}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'length':>8}  {'attention':>9}  {'seconds':>8}  {'tokens/s':>9}  {'CPU s':>8}  {'peak MiB':>9}  "
          f"{'x prev':>6}  {'estimate MiB':>12}  {'peak/est':>8}")
    rows, previous = [], {}
    for length in [parse_tokens(t) for t in (args.lengths or DEFAULT_LENGTHS[args.cp]).split(",") if t.strip()]:
        for attention in attentions:
            row = measure(length, args, attention, env)
            ratio = row["peak_mib"] / previous[attention] if attention in previous else float("nan")
            previous[attention] = row["peak_mib"]
            rows.append(row)
            estimate = f"{row['estimate_mib']:>12.1f}  {row['peak_mib'] / row['estimate_mib']:>8.2f}" \
                if attention == "new" else f"{'-':>12}  {'-':>8}"
            print(f"{format_tokens(length):>8}  {attention:>9}  {row['seconds']:>8.2f}  {row['tokens_per_s']:>9.0f}  "
                  f"{row['cpu_seconds']:>8.2f}  {row['peak_mib']:>9.1f}  {ratio:>6.2f}  {estimate}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

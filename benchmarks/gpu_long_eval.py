"""One long sequence scored on one GPU held to a memory cap: the 7B row the GPU validation has no time for.

    source /tmp/site/env.sh && python3 benchmarks/gpu_long_eval.py            # llama2-7b at 512K in 80 GB
    python3 benchmarks/gpu_long_eval.py --preset llama-1b --layers 2 --length 1M --calls 2
    python3 benchmarks/gpu_long_eval.py --dry                                  # any CPU: the toy preset at 2K

The model is the preset's shape with random weights (bf16; backend te where Transformer Engine imports, else
local). Before it is built, its estimate (eval.memory.estimate_eval_memory) is checked against --max-memory the
way `megarope eval --max-memory` checks it, and the process is then held to that much of the GPU
(torch.cuda.set_per_process_memory_fraction), so that a larger GPU shows what an 80 GB one holds. The sequence
is scored --calls times through eval.scoring.score_sequences (the first call builds cuDNN's graphs for the
shape); each call's seconds, tokens/s, attention TFLOP/s and peak memory (torch.cuda.max_memory_allocated),
and the estimate's parts, are printed and, with --json, written. llama2-7b at 512K is about 7e16 attention
FLOPs: a couple of minutes a call on an H100.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

GIB = 2**30


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama2-7b")
    ap.add_argument("--layers", type=int, help="fewer layers than the preset's (the same per-layer memory)")
    ap.add_argument("--length", default="512K", help="tokens (default 512K)")
    ap.add_argument("--max-memory", type=float, default=80.0, help="GB (1e9 bytes) the process may use (default 80)")
    ap.add_argument("--calls", type=int, default=1, help="times the sequence is scored (default 1)")
    ap.add_argument("--dry", action="store_true", help="the toy preset at 2K on whatever device there is")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    import torch

    from megarope import compat, parallel
    from megarope.eval.memory import GB, check_max_memory, estimate_eval_memory
    from megarope.eval.scoring import score_sequences
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig
    from megarope.units import format_tokens, parse_tokens

    gpu = compat.uses_cuda()
    name, length = ("toy", 2048) if args.dry else (args.preset, parse_tokens(args.length))
    preset = get_preset(name, **({"num_layers": args.layers} if args.layers else {}))
    dtype = torch.bfloat16 if gpu else torch.float32
    width = torch.finfo(dtype).bits // 8
    check_max_memory({name: preset}, [length], args.max_memory, width)  # one line and exit 2 where it cannot fit
    estimate = estimate_eval_memory(preset, length, width)
    parallel.init()
    if gpu:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory * GB / total))
    backend = "te" if gpu and importlib.util.find_spec("transformer_engine") is not None else "local"
    model = build_model(preset, RopeConfig(base=1e6, train_len=preset.max_seq_len), backend, dtype=dtype)
    ids = torch.randint(0, preset.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    result = {"preset": name, "layers": preset.num_layers, "length": length, "backend": backend,
              "dtype": str(dtype).removeprefix("torch."), "max_memory_gb": args.max_memory,
              "device": torch.cuda.get_device_name() if gpu else "cpu",
              "estimate_gib": {k: round(v / GIB, 2) for k, v in estimate.items()}, "calls": []}
    print(f"{name} ({preset.num_layers} layers), {format_tokens(length)} tokens, {backend}, {result['dtype']}, "
          f"held to {args.max_memory:g} GB; estimate {estimate['peak'] / GIB:.2f} GiB: "
          + ", ".join(f"{k} {v}" for k, v in result["estimate_gib"].items() if k != "peak"), flush=True)
    attention_flops = 4 * length * length / 2 * preset.num_heads * preset.head_dim * preset.num_layers
    for call in range(args.calls):
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        losses, _ = score_sequences(model, ids)
        if gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / GIB if gpu else None
        row = {"seconds": round(seconds, 2), "tokens_per_s": round(length / seconds),
               "attention_tflops": round(attention_flops / seconds / 1e12, 1), "loss": round(float(losses.mean()), 4),
               "peak_gib": round(peak, 2) if peak is not None else None}
        result["calls"].append(row)
        print(f"call {call + 1}: {row['seconds']} s, {row['tokens_per_s']:,} tokens/s, attention "
              f"{row['attention_tflops']} TFLOP/s, peak {row['peak_gib']} GiB (estimate {estimate['peak'] / GIB:.2f})",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    from megarope.errors import UsageError

    try:
        main()
    except UsageError as e:  # what does not fit --max-memory: one line, exit 2
        print(f"gpu_long_eval: error: {e}", file=sys.stderr)
        sys.exit(2)

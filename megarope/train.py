"""`megarope train`: continued training of a LLaMA-style model with a new RoPE base, on megatron-core.

    summary = train.run(config.load_config("examples/toy_cpu.yaml"))

One process per device (or per CPU worker); rank and world come from torchrun or Slurm through
parallel.init. A step is megatron's: get_forward_backward_func() picks the schedule for the layout
(no pipelining, 1F1B for PP, the interleaved one with virtual stages) and runs global_batch
sequences, split over the data-parallel ranks and into micro batches, through the DDP-wrapped model:
its micro-batch loop, no_sync until the last micro batch, set_is_first_microbatch (the FP8 weight
cache), the pipeline exchanges and finalize_model_grads (DP x CP reduction, sequence-parallel norm
weights over TP). Each micro batch is CP-sliced (every CP rank keeps its two chunks of each
sequence, with global positions). The optimizer steps, the learning rate comes from megatron's
OptimizerParamScheduler.

The loss is the mean over the global batch's tokens. megatron's loss_func contract (0.19.2) with
calculate_per_token_loss: each micro batch returns the sum of its token losses on this rank and its
token count; DDP then sums gradients without pre-scaling and finalize_model_grads divides them by the
tokens of the whole global batch (summed over micro batches and the DP x CP ranks). Under CP that is
each rank's partial sum over the full sequence's count, the rule of loss.mean_loss.

The optimizer (optim.make_optimizer): megatron's distributed optimizer on GPUs; torch AdamW behind a
small adapter on a CPU. Both save their state through dist_checkpointing.

Checkpoints go to checkpoint.dir (see checkpoint.save_training); a run whose checkpoint.dir holds one
resumes from it exactly (model, optimizer, scheduler, data position, RNG states). SIGTERM and SIGUSR1
save at the end of the current step and end the run with status 0.

What a run refuses, in one line on every rank, before it changes anything: a checkpoint.dir that
another run holds (checkpoint.run_lock), a checkpoint whose files are not as saved
(checkpoint.resume_point; checkpoint.on_corrupt: previous takes the one before), training data that
changed since the checkpoint (preflight.check_data). A save that fails (a full disk) stops the run with
one line and loses no earlier checkpoint. The checks that need no model are megarope.preflight's (the
dry run among them); what a step reports is megarope.train_metrics'.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megarope import checkpoint, compat, config as configuration, data, lineage, packing, parallel, preflight, trust
from megarope.errors import UsageError
from megarope.memory import model_parameters
from megarope.optim import CHECKPOINT_METADATA, make_ddp_config, make_optimizer, make_scheduler
from megarope.signals import StopSignals
from megarope.train_metrics import METRICS, MetricsWriter, finite_or_none, flops_per_token, peak_flops



# ----------------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Where a run is: what a checkpoint restores besides the weights, optimizer and RNG."""

    step: int = 0
    consumed_samples: int = 0
    nan_skips: int = 0
    loss: float | None = None  # of the last step that updated the weights


@dataclass(frozen=True)
class StepResult:
    loss: float | None  # the global batch's mean token loss; None when not finite
    grad_norm: float | None
    lr: float
    updated: bool  # False: the loss was not finite and the step was skipped
    stop_requested: bool  # a stop signal reached any rank
    seconds: float


@dataclass(frozen=True)
class Decision:
    save: bool
    stop: str | None = None  # "signal" or "exit_at_step"
    error: str | None = None  # too many non-finite steps: save, then fail with this


def decide(cfg: configuration.Config, state: TrainState, result: StepResult) -> Decision:
    """After a step: whether to checkpoint, and whether (and why) to stop."""
    t = cfg.train
    if not result.updated and state.nan_skips > t.max_nan_skips:
        return Decision(True, error=f"the loss was not finite at {state.nan_skips} steps (train.max_nan_skips = "
                                    f"{t.max_nan_skips}), the last at step {state.step}")
    if result.stop_requested:
        return Decision(True, stop="signal")
    if state.step == t.exit_at_step:
        return Decision(True, stop="exit_at_step")
    every = cfg.checkpoint.every
    return Decision(state.step == t.steps or bool(every and state.step % every == 0))


# ----------------------------------------------------------------------------------------------- data
def micro_batches(dataset, first_sample: int, micro_batch: int, dp: int, dp_rank: int, count: int, cp: int = 1,
                  packer: packing.Packing | None = None):
    """This rank's ``count`` micro batches of the global batch that starts at ``first_sample``, on its
    device (megatron's order: micro batch m of DP rank r holds samples first + (m*DP + r)*mbs ...),
    each CP-sliced when cp > 1. With ``packer``, it lays them out (and CP-slices them), and
    "packed_seq_params" holds the micro batch's documents (None when it packs none)."""
    device = parallel.device()
    for m in range(count):
        start = first_sample + (m * dp + dp_rank) * micro_batch
        samples = [dataset[i] for i in range(start, start + micro_batch)]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        documents = None
        if packer is not None:
            batch, documents = packer.pack(batch)
        elif cp > 1:
            batch = parallel.slice_for_cp(batch)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if packer is not None:
            batch["packed_seq_params"] = documents.to(device) if documents is not None else None
        yield batch


def token_loss_sum(loss_mask: torch.Tensor, losses: torch.Tensor):
    """megatron's loss_func (0.19.2, calculate_per_token_loss): (sum of this rank's token losses, their
    count, what to report). The schedule adds up the counts; finalize_model_grads divides by them."""
    mask = loss_mask.float()
    loss_sum = (losses.float() * mask).sum()
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"loss_sum": loss_sum.detach(), "tokens": tokens.detach()}


# ----------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This rank's RNG states, JSON-ready, so that a resume reads them back without unpickling anything:
    generator states as hex strings, Python's and numpy's Mersenne Twister states as lists (JSON keeps
    ints and floats exact)."""
    from megatron.core import tensor_parallel

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": _hex(torch.get_rng_state()), "python": [version, list(internal), gauss_next],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)]}
    if torch.cuda.is_available():
        state["cuda"] = _hex(torch.cuda.get_rng_state())
        state["tracker"] = {k: _hex(v) for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    return state


def _hex(generator_state: torch.Tensor) -> str:
    return generator_state.cpu().numpy().tobytes().hex()


def _generator_state(value) -> torch.Tensor:
    """A generator state from a rank file: hex (rank_R.json), or the tensor an older rank_R.pt holds."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.frombuffer(bytearray.fromhex(value), dtype=torch.uint8).clone()


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned (or an older checkpoint's rank_R.pt held)."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(_generator_state(state["torch"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(_generator_state(state["cuda"]))
        tensor_parallel.get_cuda_rng_tracker().set_states(
            {k: _generator_state(v) for k, v in state["tracker"].items()})

def _say(message: str) -> None:
    if parallel.is_main():
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------- the run
def run(cfg: configuration.Config | dict, progress: bool | None = None) -> dict:
    """Train as the config says; returns {"step", "loss", "checkpoint", "stopped", "consumed_samples",
    "nan_skips", "metrics"} (all ranks).

    Starts torch.distributed and megatron's parallel state through parallel.init (torchrun/Slurm
    environment, or a world of one) and leaves them up for the caller (`megarope train` ends them).
    ``progress``: show a tqdm bar on rank 0 (default: when stderr is a terminal).
    Bad input raises UsageError before anything is written.
    """
    cfg = cfg if isinstance(cfg, configuration.Config) else configuration.validate(cfg)
    compat.quiet()
    gpu = preflight.this_accelerator()
    preflight.check_config(cfg, gpu)
    p = cfg.parallel
    layout = parallel.init(p.tp, p.cp, p.pp, cfg.train.seed, p.vpp)
    return Trainer(cfg, layout, preflight.resolve_dtype(cfg, gpu), progress).train()


class Trainer:
    """One run: the model chunks of this rank in megatron's DDP, the optimizer, the data, the state."""

    def __init__(self, cfg: configuration.Config, layout: parallel.Layout, dtype: str, progress: bool | None):
        from megatron.core import parallel_state

        self.cfg, self.layout, self.dtype, self.progress = cfg, layout, dtype, progress
        self.root = cfg.checkpoint.dir
        self.dp_rank = parallel_state.get_data_parallel_rank()
        # What can be checked without reading or writing checkpoint.dir; the checkpoint to resume from is
        # chosen once the run holds the directory (find_resume_point).
        with parallel.fail_together():
            self.preset, self.preset_name, self.tokenizer = preflight.resolve_model_and_tokenizer(cfg)
            preflight.check_layout(cfg, self.preset, layout)
            self.sources = _data_prefixes(cfg, self.tokenizer)
            self.data_fingerprint = data.fingerprint(self.sources) if parallel.is_main() else None
        self.resume_dir, self.saved_at = None, None
        self.packer = None  # built with the dataset (build)
        # The parent's megarope.json, read once: checkpoint.keep may prune the resumed checkpoint mid-run
        self.parent_meta = checkpoint.read_meta(cfg.init.from_) if cfg.init.from_ else None
        self.lineage = self._lineage()
        self.num_micro = cfg.train.global_batch // (cfg.train.micro_batch * layout.dp)
        self.full_logits, _, self.loss_line = preflight.loss_plan(cfg, self.preset, layout.dp, dtype)

    def _lineage(self, longest_document: int | None = None) -> lineage.Lineage:
        """The pretraining this run descends from (the resumed run's, else init.from's), carried forward;
        ``longest_document``: with packed documents, the longest trained on so far (None: not yet known)."""
        d = self.cfg.data
        return lineage.training_lineage(self.parent_meta,
                                        self.cfg.rope.base, self.cfg.train.seq_len,
                                        documents=d.reset_position_ids or d.reset_attention_mask,
                                        longest_document=longest_document)

    def find_resume_point(self) -> list[str]:
        """Choose the checkpoint to resume from (verified; checkpoint.on_corrupt decides whether a damaged
        one stops the run or the one before it is taken) and check that this run continues it. Returns
        what was skipped and why. Collective; the run holds checkpoint.dir by now."""
        cfg = self.cfg
        self.resume_dir, skipped = checkpoint.resume_point(self.root, cfg.checkpoint.on_corrupt)
        if self.resume_dir:
            preflight.check_same_model(self.resume_dir, self.preset, self.preset_name)
            preflight.check_resume(cfg, self.resume_dir, self._precision(), self.layout)
            preflight.check_data(self.resume_dir, self.data_fingerprint)
        self.saved_at = self.resume_dir
        if self.resume_dir:
            self.parent_meta = checkpoint.read_meta(self.resume_dir)
        self.lineage = self._lineage()
        return skipped

    def _precision(self) -> dict:
        """What a resume must not change: the backend and the numerics."""
        t = self.cfg.train
        return {"backend": self.cfg.model.backend, "dtype": self.dtype, "fp8": t.fp8,
                "fp8_recipe": t.fp8_recipe if t.fp8 else None}

    # -- building
    def build(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megarope.model import build_model_chunks
        from megarope.rope import RopeConfig

        cfg, t = self.cfg, self.cfg.train
        self.rope = RopeConfig(**cfg.rope_config())
        try:
            self.chunks = build_model_chunks(
                self.preset, self.rope, cfg.model.backend,
                dtype=torch.bfloat16 if self.dtype == "bf16" else torch.float32,
                sequence_parallel=cfg.parallel.sequence_parallel, recompute=t.recompute, fp8=t.fp8,
                fp8_recipe=t.fp8_recipe)
        except (ImportError, ValueError) as e:
            raise UsageError(f"cannot build the model: {e}") from None
        config = self.chunks[0].config  # one TransformerConfig, shared by the chunks
        config.calculate_per_token_loss = True  # see the module docstring; DDP reads it when built
        resumed = checkpoint.read_train_state(self.resume_dir) if self.resume_dir else None
        ddp_config = make_ddp_config(torch.cuda.is_available(), resumed)  # a resume keeps the checkpoint's buckets
        self.bucket_size = ddp_config.bucket_size
        self.ddps = []
        for i, chunk in enumerate(self.chunks):
            # as megatron's training does: one bucket for all but the first chunk (their sync is not overlapped)
            ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
            for attr in ("megarope_preset", "megarope_rope", "megarope_backend"):
                setattr(ddp, attr, getattr(chunk, attr))  # loss.token_losses reads them from what it is given
            self.ddps.append(ddp)
        self.optimizer, self.optimizer_kind = make_optimizer(self.ddps, cfg, self.dtype)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        # what megatron's schedule calls around the micro batches
        config.no_sync_func = [d.no_sync for d in self.ddps] if len(self.ddps) > 1 else self.ddps[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = getattr(self.optimizer, "scale_loss", None)  # megatron's loss scale (1 in bf16)
        self.forward_backward = get_forward_backward_func()
        self.dataset = data.build_gpt_dataset(self.sources, t.seq_len, t.steps * t.global_batch, t.seed,
                                              self.tokenizer, cache_dir=cfg.data.cache_dir, **cfg.data.documents())
        self.packer = packing.Packing(
            cfg.data.reset_position_ids, cfg.data.reset_attention_mask, self.tokenizer.eod, cfg.model.backend,
            self.layout.cp, parallel_state.get_context_parallel_rank(),
            packing.thd_multiple(self.layout.cp, self.layout.tp, cfg.parallel.sequence_parallel, bool(t.fp8)))

    # -- one step
    def _forward_step(self, data_iterator, model):
        """megatron's forward_step_func: one micro batch through this chunk; the last stage returns the
        per-token losses (loss.token_losses, through GPTModel's output_processor) and the loss_func."""
        from megatron.core.utils import get_attr_wrapped_model

        from megarope.loss import token_losses

        batch = next(data_iterator)
        output = token_losses(model, batch["tokens"], batch["labels"], batch["position_ids"], with_accuracy=False,
                              full_logits=self.full_logits, packed_seq_params=batch.get("packed_seq_params"))
        if get_attr_wrapped_model(model, "post_process") and isinstance(output, tuple):
            output = output[0]  # (losses, accuracy or None): the loss is what the schedule back-propagates
        return output, functools.partial(token_loss_sum, batch["loss_mask"])

    def train_step(self, state: TrainState, stop_signal: bool) -> StepResult:
        """One optimizer step over the global batch that starts at state.consumed_samples."""
        t, started = self.cfg.train, time.perf_counter()
        for ddp in self.ddps:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        data_iterators = [micro_batches(self.dataset, state.consumed_samples, t.micro_batch, self.layout.dp,
                                        self.dp_rank, self.num_micro, self.layout.cp, self.packer) for _ in self.ddps]
        reports = self.forward_backward(forward_step_func=self._forward_step, data_iterator=data_iterators,
                                        model=self.ddps, num_microbatches=self.num_micro, seq_length=t.seq_len,
                                        micro_batch_size=t.micro_batch)
        # One world all-reduce: the loss sum and token count (the last stage holds them; TP ranks hold
        # equal copies, which the ratio cancels) and any stop signal.
        device = parallel.device()
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        for report in reports:
            totals[0] += report["loss_sum"].double()
            totals[1] += report["tokens"].double()
        totals[2] = float(stop_signal)
        if dist.is_initialized() and self.layout.world > 1:
            dist.all_reduce(totals)
        loss_sum, tokens, stops = totals.tolist()
        loss = loss_sum / max(tokens, 1.0)
        self.scheduler.step(1)
        lr = self.optimizer.param_groups[0]["lr"]
        lr = lr.item() if isinstance(lr, torch.Tensor) else float(lr)
        updated, grad_norm = False, None
        if math.isfinite(loss):
            updated, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else None
        return StepResult(finite_or_none(loss), grad_norm, lr, bool(updated), stops > 0, time.perf_counter() - started)

    # -- checkpoints
    def checkpoint_meta(self, state: TrainState, longest_document: int | None = None) -> dict:
        """megarope.json of a training checkpoint: the model, its RoPE and tokenizer, how it was trained
        (with packed documents, the options and the longest document trained on)."""
        t = self.cfg.train
        trained = {"seq_len": t.seq_len, "tokens": state.consumed_samples * t.seq_len, **self._precision(),
                   "documents": self.cfg.data.documents()}
        if longest_document is not None:
            trained["longest_document"] = longest_document
        return checkpoint.model_meta(self.chunks[0], tokenizer=self.tokenizer.spec,
                                     tokenizer_digest=self.tokenizer.digest, step=state.step, trained=trained,
                                     lineage=self._lineage(longest_document).to_dict())

    def longest_document(self) -> int | None:
        """The longest document any rank has trained on (collective: every rank calls it); None when the run
        packs no documents (the trained length is then train.seq_len)."""
        if not self.packer.active:
            return None
        value = torch.tensor([self.packer.longest], dtype=torch.int64, device=parallel.device())
        if dist.is_initialized() and self.layout.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def save(self, state: TrainState) -> str:
        """Save a checkpoint of ``state``. A save that fails (a full disk) ends the run: every rank raises
        one line naming the checkpoint, why, and the checkpoint that a rerun resumes from, which the
        failed save left as it was (and metrics.jsonl keeps every line written)."""
        cfg, layout = self.cfg, self.layout
        longest = self.longest_document()
        train_state = {"consumed_samples": state.consumed_samples, "tokens": state.consumed_samples * cfg.train.seq_len,
                       "nan_skips": state.nan_skips, "loss": state.loss, "scheduler": self.scheduler.state_dict(),
                       "longest_document": longest,
                       "optimizer": self.optimizer_kind, "ddp_bucket_size": self.bucket_size,
                       "precision": self._precision(),
                       "layout": {"tp": layout.tp, "cp": layout.cp, "pp": layout.pp, "vpp": layout.vpp,
                                  "dp": layout.dp, "world": layout.world},
                       "data": self.data_fingerprint, "config": cfg.to_dict()}
        try:
            self.saved_at = checkpoint.save_training(
                self.root, state.step, self.chunks, self.optimizer, train_state, rng_state(),
                self.checkpoint_meta(state, longest), cfg.checkpoint.keep, self.tokenizer.path,
                optimizer_metadata=CHECKPOINT_METADATA)
        except UsageError as e:
            then = (f"a rerun resumes from {self.saved_at}" if self.saved_at else "no checkpoint was saved before it")
            raise UsageError(f"{e}; the run stopped after step {state.step} and {then}") from e
        return self.saved_at

    def restore(self) -> tuple[TrainState, str]:
        """The state to start from, and a line saying where training starts."""
        cfg = self.cfg
        if self.resume_dir:
            saved, rank_state = checkpoint.load_training(self.resume_dir, self.chunks, self.optimizer)
            self.scheduler.load_state_dict(saved["scheduler"])
            if rank_state is not None:
                set_rng_state(rank_state)
            self.packer.longest = saved.get("longest_document") or 0
            self.lineage = self._lineage(saved.get("longest_document"))
            where = f"resuming from {self.resume_dir} (step {saved['step']})"
            if cfg.init.from_:
                where += "; init.from is not used when resuming"
            state = TrainState(saved["step"], saved["consumed_samples"], saved.get("nan_skips", 0), saved.get("loss"))
            return state, where
        if cfg.init.from_:
            problem = checkpoint.verify_checkpoint(cfg.init.from_)  # collective: every rank gets the same answer
            if problem:
                raise UsageError(f"init.from: {problem}")
            for chunk in self.chunks:
                checkpoint.load_model(chunk, cfg.init.from_, trust.chosen(cfg.init.trust, trust.CONFIG_OPT_IN))
            self.optimizer.reload_model_params()  # the optimizer's fp32 masters were copied from random weights
            return TrainState(), f"starting from the weights of {cfg.init.from_}"
        return TrainState(), "starting from random weights"

    # -- what the run prints
    def rope_plan(self) -> list[str]:
        """The scaling law's plan for this run's base, from the pretraining it descends from (its lineage)."""
        from megarope import planner

        lin = self.lineage
        try:
            plan = planner.make_plan(self.preset.head_dim, lin.pretrain_len, lin.effective_tune_len, [self.rope.base],
                                     [], lin.pretrain_base, self.rope.rotary_percent)
        except ValueError as e:
            return [f"RoPE plan: not available ({e})"]
        return ["RoPE plan from the lineage:", *(f"  {line}" for line in lin.describe().splitlines()),
                *(f"  {line}" if line else "" for line in planner.format_plan(plan).splitlines())]

    def documents_line(self) -> str:
        """What a document boundary (EOD) means in this run: megatron's three options, and the attention's layout."""
        options = self.cfg.data.documents()
        named = ", ".join(f"{name} {'on' if on else 'off'}" for name, on in options.items())
        if not self.packer.active:
            return f"documents: {named} (positions and attention run on across EOD)"
        te = self.cfg.model.backend == "te"
        how = ("attention inside each document, THD packing through Transformer Engine" if te
               else "attention inside each document, the others' keys skipped" if self.packer.separate
               else "attention across documents")
        return (f"documents: {named} ({how}; the law's tune length is the longest document trained on, "
                f"recorded in each checkpoint)")

    def banner(self, start: str) -> None:
        from megarope.loss import cross_entropy_name

        cfg, t, p = self.cfg, self.cfg.train, self.preset
        lines = [
            f"megarope train: {self.layout.describe()}"
            + (" with sequence parallelism" if cfg.parallel.sequence_parallel and self.layout.tp > 1 else ""),
            f"model: {self.preset_name} ({p.num_layers} layers, hidden {p.hidden_size}, {p.num_heads} heads x "
            f"{p.head_dim}, {model_parameters(p) / 1e6:,.1f}M parameters), backend {cfg.model.backend}, {self.dtype}"
            + (f", FP8 {t.fp8} ({t.fp8_recipe})" if t.fp8 else "") + (", recompute" if t.recompute else ""),
            f"data: {', '.join(f'{w:g} x {prefix}' if len(self.sources) > 1 else prefix for prefix, w in self.sources)}"
            f" ({len(self.dataset):,} samples of {t.seq_len} tokens), tokenizer {self.tokenizer.spec} "
            f"(vocab {self.tokenizer.vocab_size:,})",
            self.documents_line(),
            f"schedule: {t.steps} steps x {t.global_batch} sequences ({self.num_micro} micro batches of "
            f"{t.micro_batch} per data-parallel rank, megatron's {self.forward_backward.__name__}), AdamW lr {t.lr:g}, "
            f"warmup {t.warmup_steps}, {t.lr_decay_style} to {t.min_lr:g}, clip {t.clip_grad:g}, "
            f"optimizer {self.optimizer_kind}",
            self.loss_line + (f"; cross entropy: {cross_entropy_name(parallel.device())}" if self.full_logits else ""),
            f"RoPE: base {self.rope.base:g}, train_len {self.rope.train_len}"
            + (", dynamic NTK" if self.rope.dynamic_ntk else "")
            + (f", log-scaled from {self.rope.log_scale_ref}" if self.rope.log_scale_ref else ""),
            *self.rope_plan(),
        ]
        every = f"every {cfg.checkpoint.every} steps and " if cfg.checkpoint.every else ""
        lines.append(f"checkpoints: {self.root}, {every}at the end, keep {cfg.checkpoint.keep}; {start}")
        _say("\n".join(lines))

    def finish(self, state: TrainState, stopped: str | None, saved_at: str | None) -> dict:
        saved_at = saved_at or self.saved_at  # nothing saved: the checkpoint it resumed from
        if stopped == "signal":
            _say(f"stopped by a signal after step {state.step}; saved {saved_at}. Run the same command to resume.")
        elif stopped == "exit_at_step":
            _say(f"stopped at train.exit_at_step {state.step}; saved {saved_at}")
        else:
            _say(f"done: step {state.step}, loss {'n/a' if state.loss is None else f'{state.loss:.4f}'}, "
                 f"checkpoint {saved_at}")
        return {"step": state.step, "loss": state.loss, "checkpoint": saved_at, "stopped": stopped,
                "consumed_samples": state.consumed_samples, "nan_skips": state.nan_skips,
                "metrics": os.path.join(self.root, METRICS)}

    # -- the loop
    def train(self) -> dict:
        """The run, holding checkpoint.dir from its first write to its end (checkpoint.run_lock)."""
        with checkpoint.run_lock(self.root):  # a second run on this checkpoint.dir stops here
            return self._train()

    def _train(self) -> dict:
        t = self.cfg.train
        with parallel.fail_together():
            skipped = self.find_resume_point()
        with parallel.fail_together():
            self.build()
        checkpoint.remove_partial_saves(self.root)
        with parallel.fail_together():  # a rank whose own file fails to load stops them all
            state, where = self.restore()
        for problem in skipped:
            _say(f"checkpoint.on_corrupt=previous: skipped {problem}")
        self.banner(where)
        flops = flops_per_token(self.preset, t.seq_len) * t.global_batch * t.seq_len
        metrics = MetricsWriter(self.cfg, self.root, state.step, flops, peak_flops(self.cfg, self.dtype),
                                self.layout.world, self.progress)
        saved_at, stopped = None, None
        with metrics, StopSignals() as signals:
            while state.step < t.steps:
                result = self.train_step(state, signals.received is not None)
                state.step, state.consumed_samples = state.step + 1, state.consumed_samples + t.global_batch
                state.nan_skips += not result.updated
                state.loss = result.loss if result.updated else state.loss
                metrics.write(state, result)
                decision = decide(self.cfg, state, result)
                if decision.save:
                    saved_at = self.save(state)
                if decision.error:
                    raise UsageError(f"{decision.error}; saved {saved_at} and stopped (try a lower train.lr)")
                if decision.stop:
                    stopped = decision.stop
                    break
        return self.finish(state, stopped, saved_at)

def _data_prefixes(cfg: configuration.Config, tokenizer) -> list[tuple[str, float]]:
    """The (prefix, weight) pairs to read; "auto:toy" is prepared here (rank 0, once; the others wait
    on the host-side group, which a long preparation cannot time out)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sources = cfg.data.sources()
    if cfg.data.path == configuration.AUTO_TOY:
        with parallel.fail_together():  # also the barrier: the others read what rank 0 wrote
            if parallel.is_main():
                data.prepare_toy_data(cfg.data.prepare_dir, tokenizer)
        sources = [(data.prepare_toy_data(cfg.data.prepare_dir, tokenizer), 1.0)]
    missing = [p for p, _ in sources if not IndexedDataset.exists(p)]
    if missing:
        raise UsageError(f"no indexed dataset (.bin + .idx) at {', '.join(missing)} "
                         f"(make one with `megarope preprocess`)")
    return sources

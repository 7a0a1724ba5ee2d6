"""Run orchestration: which (checkpoint, variant) pairs to evaluate, their tokenizers, the data-parallel
split, and the checkpoint loop that holds one model at a time.

A *run* is one (checkpoint, variant) pair, named "<checkpoint label>:<variant>". RoPE has no weights,
so every variant loads the same checkpoint with other RoPE settings. A checkpoint is a megarope
checkpoint (verified against its manifest before it is loaded) or an HF model directory, converted in
memory by convert.HFCheckpoint with the tokenizer found beside it -- nothing is written. The scaling law's
inputs come from the checkpoint's lineage (megarope.lineage).

The loop (:func:`each_run`) loads a run's model, hands it to the caller's evaluation function, and
frees it -- every reference dropped, garbage collected, the CUDA cache emptied -- before the next one
is loaded: two resident 7B models would double the memory an evaluation needs. Results are kept in a
:class:`ResultLog`, which writes them out as each (run, length) completes and knows which pairs an
earlier, interrupted evaluation already finished, so a rerun can skip them. :class:`StopAndResume`
is how an evaluation (`eval`, `passkey`) stops on a signal and how a rerun knows it may resume.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megarope import attention, checkpoint, compat, convert, data, parallel
from megarope.errors import UsageError
from megarope.eval.variants import Variant
from megarope.files import write_json_atomic
from megarope.model import Preset
from megarope.signals import StopSignals, Stopped
from megarope.trust import FOREIGN, Trust

# In out_dir while an evaluation is under way (or was stopped, or died): what it evaluates, and whether a
# stop signal ended it. A rerun resumes only such an evaluation of the same settings.
UNFINISHED = "unfinished.json"
EVAL_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # training's, and Ctrl-C: what finished is kept


@dataclass
class Run:
    name: str
    checkpoint: str
    variant: Variant
    meta: dict
    tokenizer: object
    trust: Trust = FOREIGN  # how far loading its checkpoint trusts it (megarope.trust)

    @property
    def label(self) -> str:
        """The checkpoint's short name: the run's name without its variant."""
        return self.name[:-len(self.variant.name) - 1]

    @property
    def preset(self) -> Preset:
        return Preset(**self.meta["preset"])

    @property
    def rope(self) -> dict:
        """The RoPE config the run evaluates with: the checkpoint's, with the variant's overrides."""
        return {**self.meta["rope"], **self.variant.rope_overrides(self.meta["rope"])}


# ----------------------------------------------------------------------------------------------- planning
def is_hf_model(path: str) -> bool:
    """An HF model directory (config.json, no megarope.json): evaluated converted in memory (convert.HFCheckpoint)."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, checkpoint.META))


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory or HF model directory; a training run's root stands for its latest complete step."""
    if is_hf_model(path):
        return path
    if not os.path.isfile(os.path.join(path, checkpoint.META)) and os.path.isdir(path):
        latest = checkpoint.latest_checkpoint(path)
        if latest is not None:
            return latest
    checkpoint.read_meta(path)  # the one-line error for anything else
    return path


def checkpoint_labels(checkpoints: Sequence[str]) -> list[str]:
    """Short readable names: the basename (with its parent for a training step directory), or as many
    trailing path parts as make them unique."""
    parts = [os.path.normpath(os.path.abspath(c)).split(os.sep) for c in checkpoints]
    first = 2 if any(p[-1].startswith("step_") for p in parts) else 1
    for depth in range(first, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i}" for i, label in enumerate(labels)]


def read_checkpoint(path: str) -> tuple[dict, object]:
    """(metadata, the tokenizer it carries: a Tokenizer, a spec, or None) of a megarope checkpoint, or of
    an HF model directory as its conversion would record them (config, tensor names and shapes and the
    directory's tokenizer are checked; no weight is read)."""
    if is_hf_model(path):
        source = convert.inspect_hf(path)
        return convert.hf_meta(source), source.tokenizer
    return checkpoint.read_meta(path), checkpoint.tokenizer_path(path)


def resolve_tokenizer(checkpoint_dir: str, meta: dict, tokenizer=None, own=None):
    """The tokenizer to evaluate ``checkpoint_dir`` with, checked against the model (data.check_tokenizer).

    ``tokenizer``: "bytes", a .model path, an HF tokenizer directory, or None for ``own``, the one the
    checkpoint carries (a Tokenizer or its spec; None: it carries none).
    """
    if tokenizer is None:
        if own is None:
            raise UsageError(f"checkpoint {checkpoint_dir} records no tokenizer: pass --tokenizer (bytes, a .model "
                             f"or an HF tokenizer directory)")
        tok = own if isinstance(own, data.Tokenizer) else data.load_tokenizer(own)
    else:
        tok = data.load_tokenizer(tokenizer)
    data.check_tokenizer(tok, meta["preset"]["vocab_size"], meta, own if tokenizer is not None else None,
                         model=f"the model of {checkpoint_dir}")
    return tok


def plan_runs(checkpoints: Sequence[str], variants: Sequence[Variant], tokenizer=None,
              trust: Trust = FOREIGN) -> list[Run]:
    """Every (checkpoint, variant) pair, checkpoint-major, with its metadata and checked tokenizer, to be
    loaded with ``trust`` (megarope.trust).

    Reads only the checkpoints' metadata and tokenizers (an HF directory's tensor names and shapes): no weights.
    """
    if not checkpoints:
        raise UsageError("no checkpoint to evaluate")
    labels = checkpoint_labels(checkpoints)
    checkpoints = [resolve_checkpoint(c) for c in checkpoints]
    if len(set(map(os.path.abspath, checkpoints))) != len(checkpoints):
        raise UsageError("a checkpoint is given twice")
    runs = []
    for label, ckpt in zip(labels, checkpoints):
        meta, own = read_checkpoint(ckpt)
        tok = resolve_tokenizer(ckpt, meta, tokenizer, own)
        for variant in variants:
            run = Run(f"{label}:{variant.name}", ckpt, variant, meta, tok, trust)
            _ = run.rope  # validate the overrides now, before any model is built
            runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------- parallel state
def data_parallel() -> tuple[int, int, object]:
    """(rank, size, group) of the data-parallel group: documents are shared out over it."""
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


# ----------------------------------------------------------------------------------------------- models
def default_dtype() -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU (MEGAROPE_DEVICE=cpu included, which may be asked before parallel.init)."""
    return torch.bfloat16 if compat.uses_cuda() else torch.float32


def pick_backend(backend: str | None, meta: dict) -> str:
    """The asked backend, else the checkpoint's; "te" falls back to "local" where TE is not installed."""
    backend = backend or meta.get("backend", "local")
    if backend == "te" and importlib.util.find_spec("transformer_engine") is None:
        if parallel.is_main():
            print("note: Transformer Engine is not installed here; evaluating with the local backend")
        backend = "local"
    return backend


def load_run_model(run: Run, backend: str | None = None, dtype: torch.dtype | None = None,
                   cp_comm: str = "auto", hf: convert.HFCheckpoint | None = None):
    """The run's model, rebuilt with the run's RoPE variant for the current parallel state: a megarope
    checkpoint, or an HF directory converted in memory (from ``hf``, its weights as read for an earlier variant,
    where given)."""
    overrides = run.variant.rope_overrides(run.meta["rope"])
    backend, dtype = pick_backend(backend, run.meta), dtype or default_dtype()
    with warnings.catch_warnings():  # torch.distributed.checkpoint and megatron warn about CPU/world-of-one loads
        warnings.filterwarnings("ignore", module=r"(torch\.distributed\.checkpoint|megatron)")
        if is_hf_model(run.checkpoint):
            model = (hf or convert.HFCheckpoint(run.checkpoint)).model(backend, overrides, dtype=dtype)
        else:
            model = checkpoint.build_from_checkpoint(run.checkpoint, backend=backend, rope_overrides=overrides,
                                                     trust=run.trust, dtype=dtype)
    attention.set_cp_comm(model, cp_comm)
    return model


def free_memory() -> None:
    """Return what dropped models held: collect reference cycles, empty the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def each_run(runs: Iterable[Run], evaluate: Callable, backend: str | None = None, dtype: torch.dtype | None = None,
             cp_comm: str = "auto") -> Iterator[tuple[Run, object]]:
    """Yield (run, evaluate(run, model)) for each run, loading one model at a time.

    The model lives only in this frame: it is dropped and its memory freed before the next run's
    model is loaded (``evaluate`` must not keep it). A megarope checkpoint is verified against its
    manifest (collective: the hashing is shared out over the ranks) before its first run loads it, once
    however many variants read it: a damaged file loads without complaint, and is one line here instead.
    An HF directory's weights are read once for all its variants (convert.HFCheckpoint), and let go
    when the runs move on to another checkpoint.
    """
    verified, hf = set(), None
    for run in runs:
        if hf is not None and hf.path != run.checkpoint:
            hf = None
            free_memory()
        if is_hf_model(run.checkpoint):
            hf = hf or convert.HFCheckpoint(run.checkpoint)
        elif run.checkpoint not in verified:
            problem = checkpoint.verify_checkpoint(run.checkpoint)
            if problem:
                raise UsageError(f"checkpoint {run.checkpoint}: {problem}")
            verified.add(run.checkpoint)
        model = load_run_model(run, backend, dtype, cp_comm, hf)
        try:
            result = evaluate(run, model)
        finally:
            del model
            free_memory()
        yield run, result


# ----------------------------------------------------------------------------------------------- results
class ResultLog:
    """The records of an evaluation, written out as each (run, length) completes.

    ``write(records)`` is called after every added record (on rank 0: pass None elsewhere). ``resumed``
    holds records of an earlier, interrupted evaluation with the same settings: their (run, length)
    pairs count as done and are kept, in order, ahead of the new ones.
    """

    def __init__(self, write: Callable[[list[dict]], None] | None = None, resumed: Iterable[dict] = ()):
        self.records = list(resumed)
        self.write = write

    def done(self, run: str, length: int) -> bool:
        return any(r["run"] == run and r["length"] == length for r in self.records)

    def pending(self, run: str, lengths: Iterable[int]) -> list[int]:
        return [length for length in lengths if not self.done(run, length)]

    def add(self, record: dict) -> None:
        self.records.append(record)
        if self.write is not None:
            self.write(self.records)


# ----------------------------------------------------------------------------------------------- stopping
def read_unfinished(out_dir: str | None) -> dict:
    """What out_dir's unfinished.json says ({} when there is none)."""
    try:
        with open(os.path.join(out_dir, UNFINISHED)) as f:
            return json.load(f)
    except (TypeError, OSError, ValueError):
        return {}


class StopAndResume:
    """How an evaluation stops cleanly on a signal and resumes (`megarope eval` and `megarope passkey`).

        job = StopAndResume(out_dir, settings)          # settings: everything that decides the results
        keep = earlier_results(out_dir) if job.resumable else []
        with job:                                        # SIGTERM, SIGINT, SIGUSR1 remembered, not fatal
            try:
                for unit in work:
                    job.check()                          # collective: every rank stops before the same unit
                    write_results(...); job.mark_unfinished()
            except Stopped as e:
                raise job.stopped(e, "2 of 5 lengths", "passkey.json") from None
        job.finish()

    While the evaluation runs, out_dir/unfinished.json holds its settings, and the signal once one stopped
    it; ``resumable`` says whether out_dir held an unfinished evaluation of the same settings when the job
    was made, whose finished results a rerun keeps. A unit that a stop interrupts records nothing. Rank 0
    writes (decided when the job is made, from the launcher's rank where the parallel state is not up yet).
    """

    def __init__(self, out_dir: str | None, settings: dict | None):
        self.out_dir, self.settings = out_dir, settings
        self.resumable = bool(out_dir) and read_unfinished(out_dir).get("settings") == settings
        self.main = parallel.is_main()
        self._signals = StopSignals(EVAL_STOP_SIGNALS)

    def __enter__(self):
        self._signals.__enter__()
        return self

    def __exit__(self, *exc):
        self._signals.__exit__(*exc)

    def check(self) -> None:
        """Raise signals.Stopped on every rank once a stop signal reached any rank (one collective, which every
        rank must call as often)."""
        if parallel.any_rank(self._signals.received is not None):
            raise Stopped(self._signals.received)

    def mark_unfinished(self, stopped: str | bool | None = None) -> None:
        """Write unfinished.json (rank 0, with an out_dir): before the first result is written, and on a stop."""
        if self.out_dir and self.main:
            os.makedirs(self.out_dir, exist_ok=True)
            write_json_atomic(os.path.join(self.out_dir, UNFINISHED), {"settings": self.settings, "stopped": stopped})

    def stopped(self, e: Stopped, done: str, results: str) -> Stopped:
        """The Stopped to raise once ``e`` ended the work: unfinished.json records the signal, and the message
        says what is done (``done``, e.g. "2 of 5 lengths") and where (``results``, a file in out_dir)."""
        self.mark_unfinished(stopped=e.signal or True)
        where = f" (in {self.out_dir}/{results}); run the same command to resume" if self.out_dir else ""
        return Stopped(e.signal, f"stopped by {e.signal or 'a signal to another rank'} with {done} done{where}")

    def finish(self) -> None:
        """The evaluation is complete: no unfinished.json is left (rank 0)."""
        path = os.path.join(self.out_dir, UNFINISHED) if self.out_dir else None
        if path and self.main and os.path.exists(path):  # absent when every result was resumed
            os.remove(path)

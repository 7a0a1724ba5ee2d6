"""Run orchestration: which (checkpoint, variant) pairs to evaluate, their tokenizers and scaling-law
inputs, the parallel state, and the checkpoint loop that holds one model at a time.

A *run* is one (checkpoint, variant) pair, named "<checkpoint label>:<variant>". RoPE has no weights,
so every variant loads the same checkpoint with other RoPE settings.

The loop (:func:`each_run`) loads a run's model, hands it to the caller's evaluation function, and
frees it -- every reference dropped, garbage collected, the CUDA cache emptied -- before the next one
is loaded: two resident 7B models would double the memory an evaluation needs. Results are kept in a
:class:`ResultLog`, which writes them out as each (run, length) completes and knows which pairs an
earlier, interrupted evaluation already finished, so a rerun can skip them.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megarope import attention, checkpoint, data, parallel, scaling
from megarope.errors import UsageError
from megarope.eval.scoring import model_parallel_sizes
from megarope.eval.variants import Variant
from megarope.model import Preset


@dataclass
class Run:
    name: str
    checkpoint: str
    variant: Variant
    meta: dict
    tokenizer: object

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
def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory; a training run's root stands for its latest complete step."""
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


def _file_digest(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def resolve_tokenizer(checkpoint_dir: str, meta: dict, tokenizer=None):
    """The tokenizer to evaluate ``checkpoint_dir`` with, checked against the model.

    ``tokenizer`` ("bytes", a .model path, or None for the checkpoint's own). It must not have more
    tokens than the model's vocabulary, and when the checkpoint records a tokenizer, a different one
    (another vocabulary size, or another sentencepiece file's contents) is refused.
    """
    own = checkpoint.tokenizer_path(checkpoint_dir)
    if tokenizer is None:
        if own is None:
            raise UsageError(f"checkpoint {checkpoint_dir} records no tokenizer: pass --tokenizer (bytes or a .model)")
        tok = data.load_tokenizer(own)
    else:
        tok = data.load_tokenizer(tokenizer)
        if own is not None:
            recorded = data.load_tokenizer(own)
            same = recorded.vocab_size == tok.vocab_size and (
                recorded.path is None and tok.path is None and recorded.name == tok.name
                or recorded.path is not None and tok.path is not None
                and _file_digest(recorded.path) == _file_digest(tok.path))
            if not same:
                raise UsageError(f"tokenizer {tokenizer} ({tok.vocab_size} tokens) does not match the one "
                                 f"checkpoint {checkpoint_dir} records ({recorded.spec}, {recorded.vocab_size} tokens)")
    model_vocab = meta["preset"]["vocab_size"]
    if tok.vocab_size > model_vocab:
        raise UsageError(f"tokenizer {tok.spec} has {tok.vocab_size} tokens but the model of {checkpoint_dir} "
                         f"has a vocabulary of {model_vocab}: not this model's tokenizer")
    return tok


def pretraining_of(meta: dict) -> tuple[int, float]:
    """(T_train, pretraining base) for the scaling law: what the model was *originally* trained with.

    An explicit meta "pretrain_len"/"pretrain_base" wins; otherwise the preset's max_seq_len (a converted
    HF checkpoint stores max_position_embeddings there) and, for a converted checkpoint, its rope_theta,
    else LLaMA's 10000.
    """
    train_len = int(meta.get("pretrain_len") or meta["preset"]["max_seq_len"])
    base = meta.get("pretrain_base")
    if base is None and meta.get("source") == "hf":
        cfg = meta.get("hf_config") or {}
        base = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    return train_len, float(base or scaling.LLAMA_PRETRAIN_BASE)


def predicted_bound(meta: dict, base: float) -> tuple[float | None, str | None]:
    """Theorem 3's extrapolation bound for evaluating at ``base`` (None where it gives none or cannot apply)."""
    preset = meta["preset"]
    head_dim = preset["hidden_size"] // preset["num_heads"]
    train_len, pretrain_base = pretraining_of(meta)
    tune_len = max(int(meta["rope"]["train_len"]), train_len)
    try:
        plan = scaling.plan_base(head_dim, train_len, base, tune_len, pretrain_base)
    except ValueError:
        return None, None
    return plan.extrapolation_bound, plan.regime


def plan_runs(checkpoints: Sequence[str], variants: Sequence[Variant], tokenizer=None) -> list[Run]:
    """Every (checkpoint, variant) pair, checkpoint-major, with its metadata and checked tokenizer.

    Reads only the checkpoints' metadata and tokenizers: no weights.
    """
    if not checkpoints:
        raise UsageError("no checkpoint to evaluate")
    labels = checkpoint_labels(checkpoints)
    checkpoints = [resolve_checkpoint(c) for c in checkpoints]
    if len(set(map(os.path.abspath, checkpoints))) != len(checkpoints):
        raise UsageError("a checkpoint is given twice")
    metas = [checkpoint.read_meta(c) for c in checkpoints]
    tokenizers = [resolve_tokenizer(c, m, tokenizer) for c, m in zip(checkpoints, metas)]
    runs = []
    for label, ckpt, meta, tok in zip(labels, checkpoints, metas, tokenizers):
        for variant in variants:
            run = Run(f"{label}:{variant.name}", ckpt, variant, meta, tok)
            _ = run.rope  # validate the overrides now, before any model is built
            runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------- parallel state
def ensure_parallel(tp: int, cp: int) -> bool:
    """Initialize TP x CP (True) unless the caller already has (then the sizes must agree)."""
    if parallel_state.model_parallel_is_initialized():
        have = model_parallel_sizes()
        if have != (tp, cp):
            raise UsageError(f"parallel state is TP {have[0]} x CP {have[1]}, asked for TP {tp} x CP {cp}")
        return False
    parallel.init(tp=tp, cp=cp)
    return True


def data_parallel() -> tuple[int, int, object]:
    """(rank, size, group) of the data-parallel group: documents are shared out over it."""
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


# ----------------------------------------------------------------------------------------------- models
def default_dtype() -> torch.dtype:
    """bf16 on a GPU, fp32 on a CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def pick_backend(backend: str | None, meta: dict) -> str:
    """The asked backend, else the checkpoint's; "te" falls back to "local" where TE is not installed."""
    backend = backend or meta.get("backend", "local")
    if backend == "te" and importlib.util.find_spec("transformer_engine") is None:
        if parallel.is_main():
            print("note: Transformer Engine is not installed here; evaluating with the local backend")
        backend = "local"
    return backend


def load_run_model(run: Run, backend: str | None = None, dtype: torch.dtype | None = None,
                   cp_comm: str = "auto"):
    """The run's model: its checkpoint, rebuilt with the run's RoPE variant, for the current parallel state."""
    with warnings.catch_warnings():  # torch.distributed.checkpoint and megatron warn about CPU/world-of-one loads
        warnings.filterwarnings("ignore", module=r"(torch\.distributed\.checkpoint|megatron)")
        model = checkpoint.build_from_checkpoint(run.checkpoint, backend=pick_backend(backend, run.meta),
                                                 rope_overrides=run.variant.rope_overrides(run.meta["rope"]),
                                                 dtype=dtype or default_dtype())
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
    model is loaded (``evaluate`` must not keep it).
    """
    for run in runs:
        model = load_run_model(run, backend, dtype, cp_comm)
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

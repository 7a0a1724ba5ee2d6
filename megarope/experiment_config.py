"""The config of `megarope experiment` (and of `megarope demo`, its toy case): the model and the pretraining it
descends from, the continued runs (one per base), the built-in corpus or the user's data, and the evaluations.
A bad config is one UsageError line naming the key (megarope.config's loader, with this schema).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from megarope import config as configuration
from megarope.config import LogSection, ParallelSection, Section, TrainSection
from megarope.errors import UsageError
from megarope.units import parse_tokens


class LineageSection(Section):
    """The pretraining the model descends from (see megarope.lineage), as convert records it."""

    pretrain_base: float = Field(gt=1)
    pretrain_len: int = Field(ge=1)
    tune_len: int | None = Field(None, ge=1)
    """The length it was last trained at; default pretrain_len."""
    note: str | None = None
    """Where these numbers come from, in words (kept with the lineage), e.g. "likely: ...". """


class ModelSection(Section):
    source: str | None = None
    """An HF model directory (llama, mistral, qwen2), a .gguf file, or a megarope checkpoint or training run."""
    package: str | None = None
    """"name==version" of an installed Python distribution that ships ``source`` (then a path inside it)."""
    preset: str | None = None
    """Instead of a source: train this megarope.model preset from random weights first (the pretrain section)."""
    tokenizer: str | None = None
    """With preset: "bytes", a sentencepiece .model or an HF tokenizer directory (a source carries its own)."""
    lineage: LineageSection | Literal["config.json"] | None = None
    """The pretraining the source descends from; "config.json": what its config.json says (rope_theta,
    max_position_embeddings); None: what a megarope checkpoint records."""
    backend: Literal["local", "te"] = "local"
    trust: bool = False
    """A megarope checkpoint as the source may hold pickled state that runs code when loaded (FP8 delayed
    scaling's): true only for one from a source you trust (as init.trust; see megarope.trust). What the
    experiment writes itself, its stages load as their own."""

    @model_validator(mode="after")
    def _one_model(self):
        if (self.source is None) == (self.preset is None):
            raise ValueError("give exactly one of model.source and model.preset")
        if self.package and not self.source:
            raise ValueError("model.package names the distribution that ships model.source")
        if self.preset and (self.lineage is not None):
            raise ValueError("model.preset trains from random weights: its lineage is the pretrain section's")
        if self.preset and not self.tokenizer:
            raise ValueError("model.preset needs model.tokenizer (bytes, a .model file or an HF tokenizer directory)")
        if self.source and self.tokenizer:
            raise ValueError("model.tokenizer is for model.preset; a source carries its own tokenizer")
        return self


class PretrainSection(TrainSection):
    """Training from random weights (with model.preset): the train section's keys, and the RoPE base."""

    base: float = Field(10000.0, gt=1)


class TuneSection(TrainSection):
    """The continued runs: the train section's keys (seq_len is the tuning length), one run per base."""

    bases: list[float]

    @field_validator("bases")
    @classmethod
    def _bases(cls, bases):
        if not bases:
            raise ValueError("give at least one base")
        if any(not b > 1 for b in bases):
            raise ValueError(f"every base must be > 1, got {bases}")
        if len(set(bases)) != len(bases):
            raise ValueError(f"a base is given twice: {bases}")
        return bases


class DataSection(Section):
    corpus: Literal["stdlib", "stdlib-files"] = "stdlib"
    """Built in, tokenized with the model's tokenizer. "stdlib": the standard library's source and bundled
    documentation, with held-out source joined into evaluation documents as long as eval needs
    (data.stdlib_long_corpus). "stdlib-files": its source alone, 20 held-out files of >= 8 KB as the
    evaluation documents (data.stdlib_corpus: the demo's, for short lengths)."""
    train: str | None = None
    """Instead of the corpus: a megarope indexed dataset (prefix), tokenized with the model's tokenizer."""
    eval: str | None = None
    """Instead of the corpus: evaluation documents (.jsonl with "text", .txt, or a directory of them)."""
    dir: str | None = None
    """Where the corpus is prepared (default: out/data); shared by experiments that name the same one."""


class EvalGroup(Section):
    name: str | None = None
    """Its directory, out/eval-<name> (for eval.extra)."""
    bases: list[float] | None = None
    """Of tune.bases; default: all of them."""
    variants: list[str] = ["as-trained"]
    """as-trained, dynamic-ntk, log-scaled, base=B, yarn=F, or several joined by '+' (eval.variants)."""
    lengths: list[int]
    """Evaluation lengths in tokens (4K, 128K, 1M, ...), each divisible by 2*CP*TP."""
    docs: int = Field(4, ge=1)
    """Documents scored at each length."""
    enabled: bool = True
    """False: planned (its documents are held out) but not run; true later runs it alone."""

    @field_validator("lengths", mode="before")
    @classmethod
    def _token_counts(cls, lengths):
        try:
            return sorted({parse_tokens(str(n)) for n in lengths}) if isinstance(lengths, list) else lengths
        except ValueError as e:
            raise ValueError(str(e)) from None

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants):
        from megarope.eval.variants import variants_from_flags  # pure Python: no torch

        try:
            variants_from_flags(variants)
        except UsageError as e:
            raise ValueError(str(e)) from None
        return variants


class EvalSection(EvalGroup):
    extra: list[EvalGroup] = []
    """More evaluations, each with its own bases, variants, lengths and documents (e.g. a 1M row)."""
    bucket0: int | None = Field(None, ge=1)
    """First loss-by-position bucket (default: the tuning length)."""
    positions: bool = False
    """Keep every record's per-position loss curve in results.json (large at long lengths)."""
    reuse: bool = True
    """Reuse an evaluation a rerun finds finished; false: evaluate again (the demo: seconds)."""
    cp_comm: Literal["auto", "all-gather", "ring"] = "auto"

    @model_validator(mode="after")
    def _named(self):
        if not self.enabled:
            raise ValueError("eval.enabled: the main evaluation always runs (eval.extra's can wait)")
        names = [g.name for g in self.extra]
        if any(not n or not n.replace("-", "").replace("_", "").isalnum() for n in names):
            raise ValueError(f"each of eval.extra needs a name of letters, digits, - and _, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"eval.extra names repeat: {names}")
        return self


class CheckpointSection(Section):
    every: int = Field(0, ge=0)
    """Each training stage saves every this many steps (and always at the end): what a crash costs."""
    keep: int = Field(1, ge=1)
    on_corrupt: Literal["error", "previous"] = "error"


class ExperimentConfig(Section):
    out: str = "runs/experiment"
    model: ModelSection
    pretrain: PretrainSection | None = None
    tune: TuneSection
    parallel: ParallelSection = ParallelSection()
    data: DataSection = DataSection()
    eval: EvalSection
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection(tensorboard=False)

    @model_validator(mode="after")
    def _consistent(self):
        if (self.pretrain is None) != (self.model.preset is None):
            raise ValueError("a pretrain section goes with model.preset (training from random weights), and only then")
        unit = 2 * self.parallel.cp * self.parallel.tp
        groups = [("eval", self.eval)] + [(f"eval.extra.{i}", g) for i, g in enumerate(self.eval.extra)]
        lengths = [("tune.seq_len", self.tune.seq_len)] + [(f"{key}.lengths", n) for key, g in groups for n in g.lengths]
        if self.pretrain is not None:
            lengths.append(("pretrain.seq_len", self.pretrain.seq_len))
        for name, length in lengths:
            if length % unit:
                raise ValueError(f"{name}: {length} is not divisible by 2*CP*TP = {unit}")
        for key, group in groups:
            stray = [b for b in group.bases or [] if b not in self.tune.bases]
            if stray:
                raise ValueError(f"{key}.bases {stray} are not among tune.bases {self.tune.bases}")
        return self

    def groups(self) -> list[tuple[str, EvalGroup]]:
        """(stage name, group): the main evaluation, then eval.extra."""
        return [("eval", self.eval)] + [(f"eval-{g.name}", g) for g in self.eval.extra]


def load(path: str | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read an experiment config (YAML, dotted overrides); a bad one is one UsageError line naming the key."""
    return configuration.load_config(path, overrides, schema=ExperimentConfig)


def validate(raw: dict) -> ExperimentConfig:
    return configuration.validate(raw, "experiment", ExperimentConfig)

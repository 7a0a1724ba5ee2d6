"""The training configuration: a typed schema (pydantic v2), read from YAML plus dotted overrides.

    cfg = load_config("examples/toy_cpu.yaml", ["rope.base=1e6", "parallel.cp=2"])

Every section forbids unknown keys, so a typo is an error naming the key, never a silently ignored
setting. Override values are parsed as YAML (``1e6``, ``true``, ``null``, ``[1, 2]`` all work); unlike
plain PyYAML, ``1e6`` is a float here (YAML 1.2), in files and overrides alike.
This module knows nothing of torch or megatron: `megarope train` validates a config before it
imports either, so bad input costs no start-up time and leaves nothing behind.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megarope.errors import UsageError

AUTO_TOY = "auto:toy"  # data.path meaning "the Python stdlib's source, byte tokens, prepared on first use"
DOCUMENT_OPTIONS = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")  # megatron's names, data.*


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


# the base of every section, here and in other configs (megarope.experiment_config): unknown keys are errors
Section = _Section


class ModelSection(_Section):
    preset: str | None = None
    """A preset of megarope.model.PRESETS (llama2-7b, llama2-13b, llama-1b, toy). None: init.from's."""
    backend: Literal["local", "te"] = "local"
    """"te": Transformer Engine layers (GPUs; needed for FP8). "local": megatron-core's own layers."""


class YarnSection(_Section):
    """The fields of megarope.rope.Yarn (see there): YaRN through megatron-core's own table."""

    factor: float = Field(gt=0)
    original_len: int = Field(ge=1)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True


class RopeSection(_Section):
    """The fields of megarope.rope.RopeConfig (see there); train_len defaults to train.seq_len."""

    base: float = Field(10000.0, gt=1)
    rotary_percent: float = Field(1.0, gt=0, le=1)
    train_len: int | None = Field(None, ge=1)
    dynamic_ntk: bool = False
    ntk_alpha: float = 1.0
    log_scale_ref: int | None = Field(None, ge=2)
    linear_factor: float | None = None
    llama3_factor: float | None = None
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    llama3_original_len: int = Field(8192, ge=1)
    yarn: YarnSection | None = None


class ParallelSection(_Section):
    tp: int = Field(1, ge=1)
    """Tensor parallel size."""
    cp: int = Field(1, ge=1)
    """Context parallel size (each sequence is split over CP ranks)."""
    pp: int = Field(1, ge=1)
    """Pipeline parallel size: the layers are split evenly over PP stages (megatron's 1F1B schedule)."""
    vpp: int | None = Field(None, ge=2)
    """Virtual pipeline stages per pipeline rank (megatron's interleaved schedule); needs pp > 1."""
    sequence_parallel: bool = True
    """Split norms/dropout activations over the TP ranks too (only has an effect with tp > 1)."""
    gpu_memory_gb: float = Field(80.0, gt=0)
    """Memory of one GPU in GB (10^9 bytes) that `megarope train --dry-run` checks the layout against, and
    train.loss: auto decides against."""

    @model_validator(mode="after")
    def _virtual_stages_need_stages(self):
        if self.vpp is not None and self.pp < 2:
            raise ValueError(f"parallel.vpp ({self.vpp}) needs parallel.pp > 1 (it splits each pipeline stage)")
        return self


class TrainSection(_Section):
    steps: int = Field(1000, ge=1)
    """Optimizer steps in the whole run (the learning-rate schedule spans them)."""
    exit_at_step: int | None = Field(None, ge=1)
    """Save and exit (status 0) once this step is done; a later run with the same checkpoint.dir resumes."""
    seq_len: int = Field(4096, ge=2)
    global_batch: int = Field(128, ge=1)
    """Sequences per optimizer step, over all data-parallel ranks and micro batches."""
    micro_batch: int = Field(1, ge=1)
    """Sequences per forward/backward pass on one data-parallel rank."""
    lr: float = Field(2e-5, ge=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this; 0 turns clipping off."""
    seed: int = 1234
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Parameter/compute dtype. bf16 keeps fp32 master weights and fp32 gradient reduction. "auto": bf16 on
    GPUs (Transformer Engine's fused attention needs it), fp32 on a CPU; checkpoints record the one used."""
    recompute: bool = False
    """Recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)."""
    loss: Literal["auto", "full", "chunked"] = "auto"
    """How the loss meets the logits. "full": the output layer once over each micro batch and a fused cross
    entropy (fastest); "chunked": 4,096 tokens' logits at a time, recomputed in the backward pass (memory
    linear in length, one more output GEMM). "auto": full where the memory estimate with full logits fits
    parallel.gpu_memory_gb (`megarope train --dry-run` shows it), else chunked; the banner says which."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 matmuls through Transformer Engine (model.backend: te, Hopper or newer GPUs)."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "tensorwise"
    """megatron's FP8 recipe names. "tensorwise" (TE's Float8CurrentScaling) scales each tensor from its
    own current amax and stores no state in checkpoints; "delayed" keeps an amax history that TE
    checkpoints as a pickle (loaded when the run resumes, else only with init.trust or --trust-checkpoint)."""
    max_nan_skips: int = Field(10, ge=0)
    """Steps whose loss is not finite are skipped (no update); the next one past this many saves and stops."""

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch ({self.global_batch}) must be divisible by micro_batch "
                             f"({self.micro_batch})")
        return self


class DataSection(_Section):
    path: str | None = None
    """An indexed-dataset prefix (P for P.bin/P.idx, see `megarope preprocess`), or "auto:toy"."""
    blend: list[tuple[float, str]] | None = None
    """Instead of path: [[weight, prefix], ...], sampled in proportion to the weights."""
    tokenizer: str | None = None
    """"bytes" or a sentencepiece .model; None: the tokenizer init.from's checkpoint carries."""
    prepare_dir: str = "runs/data"
    """Where "auto:toy" writes the prepared corpus on first use (then reuses it)."""
    cache_dir: str | None = None
    """Where megatron keeps its dataset index caches; None: a .cache directory beside the data."""
    reset_position_ids: bool = False
    """megatron's option: positions restart after each EOD token (each document of a sequence from 0)."""
    reset_attention_mask: bool = False
    """megatron's option: a token attends only to its own document's tokens (documents packed into one
    sequence do not see each other). megarope computes no cross-document attention at all (megarope.packing)."""
    eod_mask_loss: bool = False
    """megatron's option: no loss where the input token is EOD (predicting the next document's first token)."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.blend is None):
            raise ValueError("give exactly one of data.path and data.blend")
        if self.blend is not None and not self.blend:
            raise ValueError("data.blend is empty")
        return self

    def documents(self) -> dict:
        """The three document options, by name (what a checkpoint records and a resume compares)."""
        return {name: getattr(self, name) for name in DOCUMENT_OPTIONS}

    def sources(self) -> list[tuple[str, float]]:
        """(prefix, weight) pairs, the form data.build_gpt_dataset takes."""
        if self.blend is not None:
            return [(prefix, weight) for weight, prefix in self.blend]
        return [(self.path, 1.0)]


class InitSection(_Section):
    from_: str | None = Field(None, alias="from")
    """A megarope checkpoint directory (converted or from an earlier run) to take weights from when
    checkpoint.dir holds no checkpoint yet; None: random initialization."""
    trust: bool | Literal["own"] = False
    """Whether init.from may hold pickled state that runs code when loaded (FP8 delayed scaling's, or a
    checkpoint megarope's guarded load refuses): true only for a checkpoint from a source you trust.
    "own": the checkpoint is this workflow's own earlier output (what megarope demo and experiment
    stages set); it loads as a resume does. See megarope.trust."""

    @field_validator("from_", mode="before")
    @classmethod
    def _none_word(cls, value):
        return None if isinstance(value, str) and value.strip().lower() in ("none", "") else value


class CheckpointSection(_Section):
    dir: str = "runs/train"
    """Checkpoints (step_NNNNNNN/ and the `latest` pointer), metrics.jsonl and TensorBoard logs."""
    every: int = Field(100, ge=0)
    """Save every this many steps (and always at the end); 0: only at the end."""
    keep: int = Field(3, ge=1)
    """Keep the last this many checkpoints."""
    on_corrupt: Literal["error", "previous"] = "error"
    """When the checkpoint to resume from is damaged (a file's size or SHA-256 differs from its save's
    manifest, or `latest` names no complete checkpoint): "error" stops with one line naming the file;
    "previous" says which checkpoint it skips and why, and resumes from the newest intact one before it."""


class LogSection(_Section):
    tensorboard: bool = True
    """Write TensorBoard events to checkpoint.dir/tensorboard."""
    every: int = Field(10, ge=1)
    """Print a metrics line every this many steps when there is no progress bar (logs, pipes)."""
    peak_tflops: float | None = Field(None, gt=0)
    """The accelerator's dense peak (TFLOP/s) for MFU; None: known GPUs only (H100/H200, A100)."""


class Config(_Section):
    model: ModelSection = ModelSection()
    rope: RopeSection = RopeSection()
    parallel: ParallelSection = ParallelSection()
    train: TrainSection = TrainSection()
    data: DataSection
    init: InitSection = InitSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()

    def rope_config(self) -> dict:
        """Keyword arguments of megarope.rope.RopeConfig, with train_len resolved."""
        rope = self.rope.model_dump()
        rope["train_len"] = rope["train_len"] or self.train.seq_len
        return rope

    def to_dict(self) -> dict:
        """JSON-ready, with the YAML spellings of keys ("init.from")."""
        return self.model_dump(mode="json", by_alias=True)


# ----------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: 1e6 and 5E-5 are numbers, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """An override's value, as YAML: "1e6" -> 1000000.0, "true" -> True, "null" -> None."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise UsageError(f"cannot parse value {text!r}: {str(e).splitlines()[0]}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each "dotted.key=value" in a copy of the nested dict ``raw``; a number picks an item of a list
    ("eval.extra.0.enabled=true")."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UsageError(f"override {item!r} is not of the form dotted.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for depth, part in enumerate(parents + [leaf]):
            where = ".".join((parents + [leaf])[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UsageError(f"override {item!r}: {where} is not an item of a list of {len(node)}")
                part = int(part)
            elif not isinstance(node, dict):
                raise UsageError(f"override {item!r}: {where.rpartition('.')[0]} is not a section")
            if depth == len(parents):
                node[part] = parse_value(text)
                break
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]
    return raw


def _location(loc: tuple) -> str:
    return ".".join("from" if part == "from_" else str(part) for part in loc)


def _one_line(error: ValidationError, source: str) -> str:
    parts = []
    for err in error.errors():
        where = _location(err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        elif err["type"] == "missing":
            parts.append(f"missing key {where!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
    return f"{source}: " + "; ".join(parts)


def validate(raw: dict, source: str = "config", schema: type[BaseModel] = Config):
    """A ``schema`` (Config by default) from a nested dict; any problem is one UsageError line naming the key(s)."""
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise UsageError(_one_line(e, source)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                schema: type[BaseModel] = Config):
    """Read a YAML config (or start from nothing with ``path=None``), apply dotted overrides, and validate it
    as ``schema`` (Config by default)."""
    raw: Any = {}
    source = "config"
    if path is not None:
        source = os.fspath(path)
        if not os.path.isfile(source):
            raise UsageError(f"config file not found: {source}")
        try:
            with open(source, encoding="utf-8") as f:
                raw = yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as e:
            raise UsageError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise UsageError(f"{source}: the top level must be a mapping of sections")
    return validate(apply_overrides(raw, list(overrides or [])), source, schema)


def launch_environment(tp: int, cp: int) -> dict[str, str]:
    """What a launcher puts into the ranks' environment for a TP x CP layout (before CUDA starts in them;
    a variable the user set wins). CUDA_DEVICE_MAX_CONNECTIONS=1 with TP > 1 or CP > 1: megatron-core's
    tensor-parallel layers rely on it to launch their collectives before the GEMMs they overlap with
    (tensor_parallel/layers.py warns without it under sequence parallelism), its own training refuses TP or CP
    without it on GPUs before Blackwell (megatron/training/arguments.py), and Transformer Engine asks for it
    with TP > 1 (module/base.py). The configurations that want more connections (Megatron-FSDP, MoE
    overlap) are not megarope's, and TP = CP = 1 keeps CUDA's default."""
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if tp * cp > 1 else {}

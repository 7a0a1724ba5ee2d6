"""Loading a checkpoint runs no code the user did not choose to trust.

Unpickling can run any code the pickle names, and a checkpoint in megarope's format holds pickles
that the libraries under megarope unpickle when it is loaded (read from torch 2.11 and 2.14,
megatron-core 0.19.2 and Transformer Engine 2.19):

    model/.metadata, optimizer/.metadata  torch.distributed.checkpoint's FileSystemReader.read_metadata:
                                          pickle.load (a rank's __R.metadata where .metadata is missing)
    ShardedObjects in *.distcp            torch DCP's DefaultLoadPlanner.load_bytes (megatron's planner
                                          inherits it): torch.load(weights_only=False). megatron keeps its
                                          common_state, every layer's _extra_state and the optimizer's
                                          non-tensor state there
    common.pt (megatron's older layout)   megatron's load_common: torch.load (weights_only by default)
    FP8 delayed scaling's _extra_state    Transformer Engine's set_extra_state: pickle.loads of the bytes
                                          that ShardedObject holds; TE refuses it unless
                                          NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1
    rank/rank_R.pt (older megarope)       megarope's own RNG state (now rank_R.json, see train.py)

How a load reads them (:func:`guarded_load`, around every load of a megarope checkpoint):

* .metadata is first read by :class:`MetadataUnpickler`, which builds torch DCP's metadata types and
  nothing else; a file that names anything more is refused. torch's reader then reads the same bytes.
  (Neither torch's reader nor megatron's load takes another unpickler; this needs none of their code.)
* Every torch.load inside the load is weights-only (TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 overrides DCP's
  explicit weights_only=False): tensors, plain containers and the types megatron-core registers.
  A ShardedObject or common.pt that holds anything else is refused by torch's weights-only unpickler
  before it builds anything.
* Transformer Engine's variable is set only for the run's own checkpoints (OWN) or when the user opted
  in (USER). A checkpoint whose megarope.json says it was trained with delayed scaling is refused before
  anything is read when TE layers would load it; one that hides it meets TE's own refusal.

Trust is chosen by whoever loads: FOREIGN (the default: nothing that can run code), OWN (what a run or
a workflow wrote itself: resuming inside checkpoint.dir, the demo's stages, an experiment's stages;
delayed scaling's TE state loads, everything else as FOREIGN) and USER (the user opted in with
--trust-checkpoint or init.trust: true: the load is torch's, megatron's and TE's own, unrestricted).
A command that chains stages it wrote under its own output (megarope demo; experiment stages) passes
OWN to eval.perplexity.run / eval.passkey.run / checkpoint.load_model and sets ``init.trust: own`` in
the config of a stage whose init.from is an earlier stage; nothing else should.

What remains: pickle.load of the .metadata runs after the check (the same file, re-read: one that
changes in between could differ); OWN trusts a checkpoint.dir's contents, so delayed-scaling state in a
directory copied in as checkpoint.dir is unpickled when the run itself trains with delayed scaling; the
types megatron-core registers as safe are allowed in weights-only loads; and whatever the user opts in to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import os
import pickle
import re
from dataclasses import dataclass

from megarope.errors import UsageError, causes

TE_UNSAFE_PICKLE = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"  # Transformer Engine >= 2.18 unpickles FP8 state only at 1
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch >= 2.4: every torch.load weights-only, whatever it asks
FORCE_FULL_UNPICKLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch >= 2.6: torch.load refuses both at once
CLI_OPT_IN = "--trust-checkpoint"
CONFIG_OPT_IN = "init.trust: true"
# torch DCP's metadata types live in these modules (dataclasses and enums; torch.Size and dtypes besides)
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
# the placeholders megatron-core keeps so that .metadata of its older versions unpickles
_MEGATRON_PLACEHOLDERS = {("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
                          ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan")}
_RANK_METADATA = re.compile(r"^__\d+\.metadata$")
_TE_REFUSAL = "Refusing to load pickled Transformer Engine extra state"
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+)")


@dataclass(frozen=True)
class Trust:
    """How far a load trusts a checkpoint: ``level`` is "foreign", "own" or "user"; ``opt_in`` is what a
    refusal names (how the user of this entry point opts in)."""

    level: str = "foreign"
    opt_in: str = CLI_OPT_IN

    def __post_init__(self):
        if self.level not in ("foreign", "own", "user"):
            raise ValueError(f"trust level must be foreign, own or user, got {self.level!r}")


FOREIGN = Trust()
OWN = Trust("own")


def chosen(trusted: bool | str, opt_in: str = CLI_OPT_IN) -> Trust:
    """The trust an entry point was given: True (the user's opt-in), "own" (a workflow loading what it
    wrote itself: the value `megarope demo` and experiment stages give init.trust for their earlier
    stages, and the hook for any command that chains its own outputs), or False."""
    if trusted == "own":
        return Trust("own", opt_in)
    if isinstance(trusted, bool):
        return Trust("user" if trusted else "foreign", opt_in)
    raise ValueError(f"trust must be true, false or 'own', got {trusted!r}")


# ----------------------------------------------------------------------------------------------- what a load reads
class NotMetadata(pickle.UnpicklingError):
    """A .metadata names something that is not a checkpoint metadata type (the message: what it names)."""


class MetadataUnpickler(pickle.Unpickler):
    """Builds torch DCP's .metadata and nothing else: the dataclasses and enums of its metadata, planner
    and filesystem modules, torch.Size, torch's dtypes and layouts (megatron's placeholders besides).
    Any other global stops the load before it is built: no callable outside these types is reachable,
    so nothing the file names can run."""

    def find_class(self, module: str, name: str):
        if (module, name) in _MEGATRON_PLACEHOLDERS:  # empty classes: their instances only hold attributes
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        if module == "torch" and (name == "Size" or name in _torch_dtypes()):
            return super().find_class(module, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # a layout by its name
            return super().find_class(module, name)
        raise NotMetadata(f"{module}.{name}")

    def persistent_load(self, pid):
        raise NotMetadata(f"a persistent reference {pid!r}")


@functools.cache
def _torch_dtypes() -> frozenset[str]:
    import torch  # here, not at the top: megarope.convert and the CLI import this module before torch

    return frozenset(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))


def metadata_files(directory: str, parts: tuple[str, ...]) -> list[str]:
    """The pickled DCP metadata of ``parts`` (subdirectories such as "model") of a checkpoint."""
    found = []
    for part in parts:
        where = os.path.join(directory, part)
        if os.path.isdir(where):
            found += [os.path.join(where, name) for name in sorted(os.listdir(where))
                      if name == ".metadata" or _RANK_METADATA.match(name)]
    return found


def unsafe_metadata(path: str) -> str | None:
    """What the DCP metadata file ``path`` holds beyond metadata (None: metadata only), found by
    MetadataUnpickler: nothing it names runs. A file that does not unpickle as metadata counts too."""
    try:
        with open(path, "rb") as f:
            MetadataUnpickler(f).load()
    except OSError:
        return None  # torch's reader says what is wrong with a file it cannot open
    except NotMetadata as e:
        return f"names {e}"
    except Exception as e:  # noqa: BLE001 - an allowed type given arguments it refuses, a truncated file
        return f"does not unpickle as checkpoint metadata ({type(e).__name__}: {e})"
    return None


def declares_delayed_scaling(directory: str) -> bool:
    """Whether the checkpoint's megarope.json says it was trained with FP8 delayed scaling, whose state
    Transformer Engine keeps as a pickle in every layer's _extra_state."""
    try:
        with open(os.path.join(directory, "megarope.json"), encoding="utf-8") as f:
            trained = json.load(f).get("trained") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(trained.get("fp8")) and trained.get("fp8_recipe") == "delayed"


def has_te_layers(modules) -> bool:
    """Whether any of ``modules`` (a model or a list of them) holds Transformer Engine layers: only those
    hand a checkpoint's _extra_state bytes to TE's unpickling (megatron's local layers ignore them)."""
    models = modules if isinstance(modules, (list, tuple)) else [modules]
    return any(cls.__module__.startswith("transformer_engine")
               for model in models for module in model.modules() for cls in type(module).__mro__)


# ----------------------------------------------------------------------------------------------- the load
def refusal(directory: str, what: str, trust: Trust, te_variable: bool = False) -> UsageError:
    """The one line that refuses a checkpoint: what it holds, and how this entry point's user opts in."""
    also = f" (or {TE_UNSAFE_PICKLE}=1)" if te_variable else ""
    return UsageError(f"{directory} holds {what}: unpickling it can run code; load it only if you trust where it "
                      f"came from: {trust.opt_in}{also}")


@contextlib.contextmanager
def _environment(changes: dict[str, str | None]):
    """Set (or with None, unset) these variables for the body, and put back what was there."""
    before = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            _put(name, value)
        yield
    finally:
        for name, value in before.items():
            _put(name, value)


def _put(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _refused_unpickling(error: BaseException) -> str | None:
    """What torch's weights-only unpickler or Transformer Engine refused inside a load (None: neither)."""
    for e in causes(error):
        text = str(e)
        if _TE_REFUSAL in text:
            return "FP8 delayed-scaling state that Transformer Engine keeps as a pickle"
        if isinstance(e, pickle.UnpicklingError) and _WEIGHTS_ONLY_REFUSAL in text:
            named = _UNSAFE_GLOBAL.search(text)
            return "a pickled object beyond tensors and plain data" + (f" ({named.group(1)})" if named else "")
    return None


@contextlib.contextmanager
def guarded_load(directory: str, trust: Trust = FOREIGN, parts: tuple[str, ...] = ("model",), modules=()):
    """Around a load of ``parts`` of the checkpoint ``directory`` into ``modules``: refuse, in one line
    naming ``trust.opt_in``, what would need an unpickler that can run code, then run the body with
    weights-only torch.load and Transformer Engine's variable set only as far as ``trust`` goes.

    USER: the body runs as torch, megatron and TE load, with TE's variable set. FOREIGN and OWN: every
    metadata file must be metadata only (MetadataUnpickler); a checkpoint that declares delayed
    scaling, loaded into TE layers, is refused (FOREIGN, unless the user set TE's variable) or loaded
    with the variable set (OWN); refusals that torch's weights-only unpickler or TE raise in the body
    become the same one line. Reads files only (every rank can call it: all get the same answer).
    """
    changes: dict[str, str | None] = {TE_UNSAFE_PICKLE: "1"}
    if trust.level != "user":
        for path in metadata_files(directory, parts):
            problem = unsafe_metadata(path)
            if problem:
                raise refusal(directory, f"pickled metadata beyond torch's checkpoint types "
                                         f"({os.path.relpath(path, directory)} {problem})", trust)
        changes = {FORCE_WEIGHTS_ONLY: "1", FORCE_FULL_UNPICKLE: None}
        if has_te_layers(modules) and declares_delayed_scaling(directory) and os.environ.get(TE_UNSAFE_PICKLE) != "1":
            if trust.level == "foreign":
                raise refusal(directory, "FP8 delayed-scaling state that Transformer Engine keeps as a pickle",
                              trust, te_variable=True)
            changes[TE_UNSAFE_PICKLE] = "1"
    with _environment(changes):
        try:
            yield
        except BaseException as e:  # torch's CheckpointException is a BaseException
            what = _refused_unpickling(e) if trust.level != "user" else None
            if what is None:
                raise
            raise refusal(directory, what, trust, te_variable="Transformer Engine" in what) from e

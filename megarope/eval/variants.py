"""Evaluation-time RoPE variants: how one checkpoint is read at lengths past its training.

A variant is "as-trained", or parts joined by "+": "dynamic-ntk", "log-scaled", "base=B", "yarn=F"
(e.g. "dynamic-ntk+log-scaled", "yarn=4+base=5e5"). RoPE has no weights, so a variant is only a set of overrides of
the checkpoint's RoPE config (checkpoint.build_from_checkpoint's rope_overrides). Pure Python: no torch.

A new part is one entry in FLAG_PARTS (a word) or VALUE_PARTS (a "key=value": its placeholder for
messages and its parser, which returns the Variant fields it sets), one field on Variant, and its
line in Variant.rope_overrides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from megarope.errors import UsageError

VARIANT_PARTS = ("as-trained", "dynamic-ntk", "log-scaled")


@dataclass(frozen=True)
class Variant:
    """How RoPE is applied at evaluation time; None fields keep what the checkpoint records."""

    name: str
    dynamic_ntk: bool = False
    log_scaled: bool = False
    log_scale_ref: int | None = None  # T_ref; None: the checkpoint's RoPE train_len (its tuning length)
    base: float | None = None
    yarn_factor: float | None = None  # YaRN by this factor, from the checkpoint's trained length

    def rope_overrides(self, rope: dict) -> dict:
        """The RopeConfig fields this variant changes, given the checkpoint's RoPE config ``rope``."""
        out = {}
        if self.base is not None:
            out["base"] = float(self.base)
        if self.dynamic_ntk:
            out["dynamic_ntk"] = True
        if self.log_scaled:
            ref = self.log_scale_ref if self.log_scale_ref is not None else int(rope["train_len"])
            if ref < 2:
                raise UsageError(f"log-scaled attention needs T_ref >= 2, got {ref}")
            out["log_scale_ref"] = ref
        if self.yarn_factor is not None:
            out["yarn"] = self._yarn(rope)
        return out

    def _yarn(self, rope: dict) -> dict:
        """megatron-core's YaRN (rope.Yarn fields, the same path convert maps config.json's "yarn" onto) by
        ``yarn_factor``, its original length the checkpoint's trained length (train_len); a checkpoint that
        ships YaRN keeps its own original length and ramp, with the new factor."""
        name = f"yarn={self.yarn_factor:g}"
        for key, what in (("linear_factor", "linear interpolation"), ("llama3_factor", "Llama-3 scaling")):
            if rope.get(key) is not None:
                raise UsageError(f"variant {name}: the checkpoint already scales RoPE ({what} x{rope[key]:g}); "
                                 f"YaRN applies to a checkpoint with a plain RoPE or YaRN")
        if float(rope.get("rotary_percent", 1.0)) != 1.0:
            raise UsageError(f"variant {name}: megatron's YaRN rotates whole heads, and the checkpoint rotates "
                             f"{rope['rotary_percent']:g} of each")
        own = rope.get("yarn") or {"original_len": int(rope["train_len"])}
        return {**own, "factor": float(self.yarn_factor)}


def _base(value: str, text: str) -> dict:
    try:
        base = float(value)
    except ValueError:
        raise UsageError(f"variant {text!r}: {value!r} is not a number") from None
    if not base > 1:
        raise UsageError(f"variant {text!r}: the RoPE base must be > 1")
    return {"base": base}


def _yarn_factor(value: str, text: str) -> dict:
    try:
        factor = float(value)
    except ValueError:
        raise UsageError(f"variant {text!r}: {value!r} is not a number") from None
    if not factor >= 1:  # also refuses nan
        raise UsageError(f"variant {text!r}: the YaRN factor must be >= 1 (it stretches the trained length)")
    return {"yarn_factor": factor}


FLAG_PARTS: dict[str, dict] = {"dynamic-ntk": {"dynamic_ntk": True}, "log-scaled": {"log_scaled": True}}
VALUE_PARTS: dict[str, tuple[str, Callable[[str, str], dict]]] = {  # key: (placeholder, parser)
    "base": ("B", _base), "yarn": ("F", _yarn_factor)}


def _part_fields(part: str, text: str) -> dict:
    if part in FLAG_PARTS:
        return FLAG_PARTS[part]
    key, is_valued, value = part.partition("=")
    if is_valued and key in VALUE_PARTS:
        return VALUE_PARTS[key][1](value, text)
    valued = ", ".join(f"{key}={placeholder}" for key, (placeholder, _) in VALUE_PARTS.items())
    raise UsageError(f"unknown variant {part!r} in {text!r}; use {', '.join(VARIANT_PARTS)}, {valued}, "
                     f"or several joined by '+'")


def parse_variant(text: str, rope_base: float | None = None, log_scale_ref: int | None = None) -> Variant:
    """"as-trained", "dynamic-ntk", "log-scaled", "base=B", "yarn=F", or several of the last four joined by "+"
    (dynamic NTK rescales a plain base, so "dynamic-ntk" and "yarn=F" do not combine).

    ``rope_base`` (--rope-base) applies where the text names no base; ``log_scale_ref`` (--log-scale)
    is the T_ref of a log-scaled variant. Both show in the name.
    """
    parts = [p.strip() for p in text.split("+") if p.strip()]
    if not parts:
        raise UsageError(f"empty variant {text!r}")
    variant = Variant("", base=rope_base)
    for part in parts:
        if part == "as-trained" and len(parts) == 1:
            continue
        variant = replace(variant, **_part_fields(part, text))
    if variant.dynamic_ntk and variant.yarn_factor is not None:
        raise UsageError(f"variant {text!r}: dynamic-ntk rescales a plain base; it does not combine with yarn")
    name = "+".join(p for p in parts if p != "as-trained") or "as-trained"
    if rope_base is not None and not any(p.startswith("base=") for p in parts):
        name = f"{name}+base={rope_base:g}" if name != "as-trained" else f"base={rope_base:g}"
    if variant.log_scaled and log_scale_ref is not None:
        name = name.replace("log-scaled", f"log-scaled({log_scale_ref})")
    return replace(variant, name=name, log_scale_ref=log_scale_ref if variant.log_scaled else None)


def variants_from_flags(variants: Sequence[str | Variant] | None, rope_base: float | None = None,
                        dynamic_ntk: bool = False, log_scale_ref: int | None = None) -> list[Variant]:
    """The CLI's rule: --variants lists them; without it, --dynamic-ntk/--log-scale make the one variant."""
    if variants:
        if dynamic_ntk:
            raise UsageError("--dynamic-ntk applies to a single variant; with --variants, name it there "
                             "(e.g. --variants as-trained,dynamic-ntk)")
        out = [v if isinstance(v, Variant) else parse_variant(v, rope_base, log_scale_ref) for v in variants]
        if log_scale_ref is not None and not any(v.log_scaled for v in out):
            raise UsageError("--log-scale T_REF sets the T_ref of log-scaled variants, and --variants has none")
    else:
        parts = ["dynamic-ntk"] * dynamic_ntk + ["log-scaled"] * (log_scale_ref is not None)
        out = [parse_variant("+".join(parts) or "as-trained", rope_base, log_scale_ref)]
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise UsageError(f"variants repeat: {', '.join(names)}")
    return out

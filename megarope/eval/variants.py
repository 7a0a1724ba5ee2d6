"""Evaluation-time RoPE variants: how one checkpoint is read at lengths past its training.

A variant is "as-trained", or parts joined by "+": "dynamic-ntk", "log-scaled", "base=B"
(e.g. "dynamic-ntk+log-scaled"). RoPE has no weights, so a variant is only a set of overrides of
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
        return out


def _base(value: str, text: str) -> dict:
    try:
        base = float(value)
    except ValueError:
        raise UsageError(f"variant {text!r}: {value!r} is not a number") from None
    if not base > 1:
        raise UsageError(f"variant {text!r}: the RoPE base must be > 1")
    return {"base": base}


FLAG_PARTS: dict[str, dict] = {"dynamic-ntk": {"dynamic_ntk": True}, "log-scaled": {"log_scaled": True}}
VALUE_PARTS: dict[str, tuple[str, Callable[[str, str], dict]]] = {"base": ("B", _base)}  # key: (placeholder, parser)


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
    """"as-trained", "dynamic-ntk", "log-scaled", "base=B", or several of the last three joined by "+".

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

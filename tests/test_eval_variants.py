"""Evaluation-time RoPE variants: parsing, naming, the CLI's flag rules, one-line errors."""

import pytest

from megarope.errors import UsageError
from megarope.eval.variants import parse_variant, variants_from_flags


def test_variants():
    assert parse_variant("as-trained").rope_overrides({"train_len": 4096}) == {}
    v = parse_variant("dynamic-ntk+log-scaled")
    assert v.rope_overrides({"train_len": 4096}) == {"dynamic_ntk": True, "log_scale_ref": 4096}
    log = parse_variant("log-scaled", log_scale_ref=1000)
    assert log.rope_overrides({"train_len": 4096}) == {"log_scale_ref": 1000}
    assert parse_variant("base=500").rope_overrides({"train_len": 4096}) == {"base": 500.0}
    assert [v.name for v in variants_from_flags(None, dynamic_ntk=True, log_scale_ref=64)] == \
        ["dynamic-ntk+log-scaled(64)"]
    assert [v.name for v in variants_from_flags(None, rope_base=500)] == ["base=500"]
    for bad in ("bogus", "base=x", "base=1"):
        with pytest.raises(UsageError):
            parse_variant(bad)
    with pytest.raises(UsageError):
        variants_from_flags(["as-trained", "as-trained"])
    with pytest.raises(UsageError):
        variants_from_flags(["as-trained"], dynamic_ntk=True)
    with pytest.raises(UsageError):
        variants_from_flags(["as-trained", "dynamic-ntk"], log_scale_ref=100)


def test_names_and_combinations():
    assert parse_variant("dynamic-ntk+base=500").name == "dynamic-ntk+base=500"
    assert parse_variant("dynamic-ntk", rope_base=500).name == "dynamic-ntk+base=500"
    assert parse_variant("base=2e6+log-scaled").rope_overrides({"train_len": 128}) == \
        {"base": 2e6, "log_scale_ref": 128}
    with pytest.raises(UsageError, match="unknown variant 'as-trained'"):
        parse_variant("as-trained+dynamic-ntk")  # as-trained only stands alone
    with pytest.raises(UsageError, match="T_ref >= 2"):
        parse_variant("log-scaled").rope_overrides({"train_len": 1})


def test_variants_need_no_torch():
    import subprocess
    import sys

    code = "import sys, megarope.eval.variants; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

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


def test_yarn_variant():
    """yarn=F: megatron's YaRN by F from the checkpoint's trained length (a YaRN checkpoint keeps its own
    original length and ramp); refused in one line where it cannot apply."""
    plain = {"train_len": 4096, "rotary_percent": 1.0}
    assert parse_variant("yarn=4").rope_overrides(plain) == {"yarn": {"factor": 4.0, "original_len": 4096}}
    both = parse_variant("yarn=8+base=5e5")
    assert both.name == "yarn=8+base=5e5"
    assert both.rope_overrides(plain) == {"base": 5e5, "yarn": {"factor": 8.0, "original_len": 4096}}
    shipped = {**plain, "yarn": {"factor": 4.0, "original_len": 1024, "beta_fast": 16.0}}
    assert parse_variant("yarn=2").rope_overrides(shipped)["yarn"] == \
        {"factor": 2.0, "original_len": 1024, "beta_fast": 16.0}
    assert [v.name for v in variants_from_flags(["as-trained", "yarn=4", "dynamic-ntk"])] == \
        ["as-trained", "yarn=4", "dynamic-ntk"]
    for bad, match in (("yarn=x", "'x' is not a number"), ("yarn=0.5", "YaRN factor must be >= 1"),
                       ("yarn=nan", "YaRN factor must be >= 1"), ("yarn", "unknown variant 'yarn'.*yarn=F"),
                       ("yarn=4+dynamic-ntk", "does not combine with yarn")):
        with pytest.raises(UsageError, match=match) as err:
            parse_variant(bad)
        assert len(str(err.value).splitlines()) == 1
    with pytest.raises(UsageError, match="already scales RoPE .Llama-3 scaling x8."):
        parse_variant("yarn=4").rope_overrides({**plain, "llama3_factor": 8.0})
    with pytest.raises(UsageError, match="rotates whole heads"):
        parse_variant("yarn=4").rope_overrides({**plain, "rotary_percent": 0.5})


def test_yarn_variant_builds_megatrons_yarn_embedding(tmp_path):
    """The variant's model carries megatron-core's own YaRN rotary embedding, scaled from the trained length,
    and reads the same tokens differently from the model as trained."""
    import torch
    from eval_helpers import save_toy_checkpoint
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    from megarope import parallel
    from megarope.eval import runs

    ckpt = save_toy_checkpoint(tmp_path / "ckpt", train_len=128)
    plain_run, yarn_run = runs.plan_runs([ckpt], variants_from_flags(["as-trained", "yarn=4"]))
    tokens = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(512)[None]
    parallel.init()
    try:
        logits = []
        for run in (plain_run, yarn_run):
            model = runs.load_run_model(run).eval()
            with torch.no_grad():
                logits.append(model(tokens, positions, None))
        rotary = model.rotary_pos_emb
        assert isinstance(rotary, YarnRotaryEmbedding)
        assert (rotary.scaling_factor, rotary.original_max_position_embeddings) == (4.0, 128)
        own = YarnRotaryEmbedding(kv_channels=rotary.dim, rotary_base=10000.0, scaling_factor=4.0,
                                  original_max_position_embeddings=128, use_cpu_initialization=True)
        assert torch.equal(rotary(512)[0], own(512)[0]) and rotary(512)[1] == own(512)[1]
    finally:
        parallel.destroy()
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)

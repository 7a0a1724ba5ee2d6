"""What `megarope train` refuses before it builds anything, and its dry run: from the config and shapes alone.

The checks that need a run (a checkpoint to resume, the data it was trained on) are in test_train.py.
"""

import os

import pytest

from megarope import config, preflight
from megarope.cli import main
from megarope.errors import UsageError
from megarope.model import get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(tmp_path, *overrides) -> config.Config:
    """A toy run's config; the data is never read by the checks."""
    raw = {"model": {"preset": "toy"},
           "train": {"steps": 6, "seq_len": 64, "global_batch": 4, "micro_batch": 2, "warmup_steps": 1},
           "data": {"path": str(tmp_path / "never-read"), "tokenizer": "bytes"},
           "checkpoint": {"dir": str(tmp_path / "run")}, "log": {"tensorboard": False}}
    return config.validate(config.apply_overrides(raw, list(overrides)))


H100 = preflight.Accelerator("NVIDIA H100 80GB HBM3", (9, 0), 85.0)


def test_gpu_checks_before_anything_starts(tmp_path):
    cfg = lambda *o: make_cfg(tmp_path, *o)  # noqa: E731
    assert preflight.resolve_dtype(cfg(), H100) == "bf16" and preflight.resolve_dtype(cfg(), None) == "fp32"
    assert preflight.resolve_dtype(cfg("train.dtype=fp32"), H100) == "fp32"
    preflight.check_config(cfg("model.backend=te", "parallel.cp=2"), H100)  # auto: bf16
    with pytest.raises(UsageError, match="train.dtype fp32 has no context-parallel attention"):
        preflight.check_config(cfg("model.backend=te", "parallel.cp=2", "train.dtype=fp32"), H100)
    fp8 = ("model.backend=te", "train.fp8=e4m3", "train.fp8_recipe=mxfp8")
    with pytest.raises(UsageError, match="mxfp8 needs a Blackwell GPU .* has 9.0"):
        preflight.check_config(cfg(*fp8), H100)
    preflight.check_config(cfg(*fp8), preflight.Accelerator("NVIDIA B200", (10, 0), 180.0))
    toy = get_preset("toy")  # hidden 128, 4 heads + 2 x 2 KV groups of 32, ffn 352
    preflight.check_fp8_shapes(toy, cfg("train.fp8=e4m3", "parallel.tp=2"))
    with pytest.raises(UsageError, match=r"ffn / TP = 88 \(TP 4\)"):
        preflight.check_fp8_shapes(toy, cfg("train.fp8=e4m3", "parallel.tp=4"))
    with pytest.raises(UsageError, match="36 tokens per rank .* not divisible by 8"):
        preflight.check_fp8_shapes(toy, cfg("train.fp8=e4m3", "train.seq_len=72", "parallel.tp=2",
                                            "train.micro_batch=1", "train.global_batch=4"))
    # the te backend packs documents as THD: what it cannot do is refused before anything starts
    packed = ("model.backend=te", "data.reset_position_ids=true", "data.reset_attention_mask=true")
    preflight.check_config(cfg(*packed, "parallel.cp=2", "train.fp8=e4m3"), H100)
    for extra, words in ((("data.reset_attention_mask=false",), "positions and attention restart together"),
                         (("parallel.pp=2",), "use parallel.pp 1, or model.backend local"),
                         (("rope.dynamic_ntk=true", "rope.train_len=32"), "dynamic NTK cannot take each document")):
        with pytest.raises(UsageError, match=words):
            preflight.check_config(cfg(*packed, *extra), H100)
    preflight.check_config(cfg(*packed, "rope.dynamic_ntk=true"), H100)  # train_len = seq_len: no base changes
    preflight.check_config(cfg("data.reset_position_ids=true", "rope.dynamic_ntk=true", "rope.train_len=32"), None)


# ----------------------------------------------------------------------------------------------- dry run
LLAMA_70B = os.path.join(REPO, "examples", "llama2_70b_base1e6_16k.yaml")


def test_the_70b_example_passes_its_dry_run(capsys):
    assert main(["train", LLAMA_70B, "--dry-run", "--world", "128"]) == 0
    out = capsys.readouterr().out
    assert "world 128 = TP 8 x CP 2 x PP 4 x DP 2" in out and "68.98B parameters" in out
    assert "fits <- this config" in out
    for part in ("weights", "gradients", "optimizer shard", "recompute off", "recompute on", "workspace"):
        assert part in out


def test_the_loss_is_full_where_the_logits_fit_chunked_where_not_and_the_config_forces_either(capsys):
    """train.loss: auto decides from the memory estimate against parallel.gpu_memory_gb; the dry run and the
    banner say which."""
    def plan(*overrides):
        cfg = config.load_config(LLAMA_70B, list(overrides))
        return preflight.loss_plan(cfg, get_preset("llama2-70b"), 2, "bf16")

    full, estimate, line = plan()
    assert full and line.startswith("loss: full logits") and "of 80.0 GB" in line
    needed = estimate.total(False, full_logits=True) / 1e9
    full, _, line = plan(f"parallel.gpu_memory_gb={needed - 0.01}")
    assert not full and line.startswith("loss: chunked") and "would not fit" in line
    assert plan(f"parallel.gpu_memory_gb={needed - 0.01}", "train.loss=full")[0]
    full, _, line = plan("train.loss=chunked")
    assert not full and line.endswith("(train.loss: chunked)")
    assert main(["train", LLAMA_70B, "train.loss=chunked", "--dry-run", "--world", "128"]) == 0
    out = capsys.readouterr().out
    assert "  loss  " in out and "chunked, one micro batch's" in out and "(train.loss: chunked)" in out


def test_a_dry_run_refuses_a_layout_that_does_not_fit(capsys):
    assert main(["train", LLAMA_70B, "parallel.pp=1", "parallel.cp=1", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "TP 8 x CP 1 x PP 1 x DP 1" in captured.out  # the estimate is shown, then one line says why not
    assert captured.err.count("\n") == 1 and "more than parallel.gpu_memory_gb = 80" in captured.err
    assert main(["train", LLAMA_70B, "parallel.gpu_memory_gb=141", "--dry-run"]) == 0  # an H200
    assert main(["train", LLAMA_70B, "--world", "8"]) == 2
    assert "--world is for --dry-run" in capsys.readouterr().err

"""Training on one GPU through train.run: megatron's distributed optimizer saves, and a resume is exact."""

import torch

from gpu_setup import CUDA, step_losses, train_config
from megarope import checkpoint, optim, parallel, train


def _weights(directory: str) -> dict:
    parallel.init()
    model = checkpoint.build_from_checkpoint(directory)
    weights = {k: v.float().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor) and v.numel()}
    parallel.destroy()
    return weights


def test_a_run_stopped_and_resumed_equals_one_that_never_stopped(tmp_path, toy_data_dir, monkeypatch, record_property):
    monkeypatch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # TE's attention backward, deterministic
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    done = train.run(train_config(full, toy_data_dir))
    parallel.destroy()
    first = train.run(train_config(split, toy_data_dir, exit_at_step=2))
    parallel.destroy()
    assert (first["step"], first["stopped"]) == (2, "exit_at_step")
    rest = train.run(train_config(split, toy_data_dir))
    parallel.destroy()
    assert rest["step"] == done["step"] == 4

    saved = checkpoint.read_train_state(done["checkpoint"])
    record_property("optimizer", saved.get("optimizer"))
    # the pinned gradient bucket size, so that the distributed optimizer's state resumes at any DP
    assert saved["ddp_bucket_size"] == (optim.DDP_BUCKET_SIZE if CUDA else None)
    expected, got = step_losses(full), step_losses(split)
    record_property("losses", expected)
    record_property("resumed_minus_uninterrupted", {s: got[s] - expected[s] for s in expected})
    assert expected[4] < expected[1]  # it trains
    for step in (3, 4):
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got[step], expected[step])
    a, b = _weights(done["checkpoint"]), _weights(rest["checkpoint"])
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    record_property("max_abs_weight_diff", worst)
    assert worst == 0.0

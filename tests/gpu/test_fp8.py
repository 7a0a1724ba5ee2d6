"""FP8 on one GPU: the FP8 forward follows every optimizer step, FP8 training tracks bf16, FP8 checkpoints
reload (the default tensorwise recipe stores no pickle; delayed scaling's pickle loads when the run resumes,
and from anyone else's copy only with the opt-in)."""

import contextlib
import os
import shutil

import pytest
import torch
from megatron.core import dist_checkpointing

from gpu_setup import HOPPER, TE, needs_te, step_losses, train_config
from megarope import checkpoint, parallel, train, trust
from megarope.errors import UsageError
from megarope import loss as L
from megarope.model import Preset, build_model, get_preset
from megarope.rope import RopeConfig

pytestmark = needs_te
SEQ = 512  # FP8 GEMMs want token counts divisible by 8 and dims by 16: the toy preset's are


def _schedule_loss(model, batch, forward_only: bool) -> float:
    """One micro batch through megatron's forward_backward_func, as training runs it: the schedule tells
    Transformer Engine at each step's first micro batch to cast the weights to FP8 again."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = batch[0]

    def forward_step(data_iterator, model):
        tokens, labels = next(data_iterator)
        losses, _ = L.token_losses(model, tokens, labels, with_accuracy=False)
        return losses, lambda out: (out.mean(), {"loss": out.detach().mean()})

    with torch.no_grad() if forward_only else contextlib.nullcontext():
        reduced = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=model,
                                              num_microbatches=1, seq_length=tokens.shape[1],
                                              micro_batch_size=tokens.shape[0], forward_only=forward_only)
    return reduced[0]["loss"].item()


def _fp8_model():
    parallel.seed_everything(5)
    return build_model(get_preset("toy", max_seq_len=SEQ), RopeConfig(base=1e4, train_len=SEQ), "te",
                       dtype=torch.bfloat16, fp8="hybrid", fp8_recipe="tensorwise")


def test_the_fp8_forward_follows_each_optimizer_step_through_megatrons_schedule(record_property):
    parallel.init()
    model = _fp8_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 257, (2, SEQ + 1), generator=torch.Generator().manual_seed(1)).cuda()
    batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        _schedule_loss(model, batch, forward_only=False)
        optimizer.step()

    before = _schedule_loss(model, batch, forward_only=True)
    train_step()
    after = _schedule_loss(model, batch, forward_only=True)
    fresh = _fp8_model()  # a model that never cast anything, with the stepped weights
    fresh.load_state_dict(model.state_dict())
    fresh_loss = _schedule_loss(fresh, batch, forward_only=True)
    # What a loop without the schedule's reset gets: TE reuses the FP8 weights cast before the step.
    train_step()
    with torch.no_grad():
        losses, _ = L.token_losses(model, *batch, with_accuracy=False)
    without_reset = losses.mean().item()
    with_reset = _schedule_loss(model, batch, forward_only=True)
    record_property("loss_before_step", before)
    record_property("loss_after_step", after)
    record_property("loss_of_a_fresh_model_with_the_stepped_weights", fresh_loss)
    record_property("second_step_without_reset_reuses_old_fp8_weights",
                    abs(without_reset - after) < abs(without_reset - with_reset))
    assert abs(after - before) > 1e-2, "the optimizer step did not reach the FP8 forward"
    assert abs(after - fresh_loss) < 1e-3 * abs(fresh_loss)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_data_dir):
    """bf16 and FP8 (tensorwise) runs of 4 steps, and the FP8 run stopped after step 2 and resumed."""
    if not TE:
        pytest.skip("needs a CUDA GPU and Transformer Engine")
    root = tmp_path_factory.mktemp("fp8")
    done = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
        patch.delenv(trust.TE_UNSAFE_PICKLE, raising=False)
        for name, extra in (("bf16", {}), ("fp8", {"fp8": "hybrid"}), ("fp8-split", {"fp8": "hybrid", "exit_at_step": 2}),
                            ("fp8-split", {"fp8": "hybrid"})):
            done[name] = train.run(train_config(str(root / name), toy_data_dir, **extra))
            done[name]["dir"] = str(root / name)
            parallel.destroy()
    return done


def test_fp8_training_tracks_bf16_and_resumes_exactly(runs, record_property):
    bf16, fp8, split = (step_losses(runs[name]["dir"]) for name in ("bf16", "fp8", "fp8-split"))
    record_property("bf16_losses", bf16)
    record_property("fp8_losses", fp8)
    record_property("fp8_resumed_losses", split)
    assert runs["fp8-split"]["step"] == 4 and fp8[4] < fp8[1]
    for step in bf16:
        assert abs(fp8[step] - bf16[step]) <= 0.02 * bf16[step], (step, fp8[step], bf16[step])
    for step in (3, 4):  # the resumed run casts its loaded weights afresh: a stale FP8 cache shows up here
        assert abs(split[step] - fp8[step]) <= 1e-3 * fp8[step], \
            f"step {step}: resumed {split[step]} != uninterrupted {fp8[step]} (FP8 weights not recast each step?)"
    assert os.environ.get(trust.TE_UNSAFE_PICKLE) is None


def test_an_fp8_checkpoint_reloads_for_evaluation(runs):
    model = checkpoint.build_from_checkpoint(runs["fp8"]["checkpoint"], backend="te", dtype=torch.bfloat16)
    tokens = torch.randint(0, 257, (1, SEQ + 1), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        losses, correct = L.token_losses(model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    assert torch.isfinite(losses).all() and correct.shape == losses.shape
    assert os.environ.get(trust.TE_UNSAFE_PICKLE) is None


def test_a_delayed_scaling_checkpoint_resumes(tmp_path, toy_data_dir, monkeypatch, record_property):
    monkeypatch.delenv(trust.TE_UNSAFE_PICKLE, raising=False)
    root = str(tmp_path / "delayed")
    first = train.run(train_config(root, toy_data_dir, fp8="hybrid", fp8_recipe="delayed", steps=2, exit_at_step=1))
    parallel.destroy()
    # Transformer Engine itself refuses the pickled amax history without the variable ...
    parallel.init()
    meta = checkpoint.read_meta(first["checkpoint"])
    model = build_model(Preset(**meta["preset"]), RopeConfig(**meta["rope"]), "te", dtype=torch.bfloat16)
    state = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(first["checkpoint"], "model"))
    try:
        model.load_state_dict(state, strict=False)
        refused = None
    except RuntimeError as e:
        refused = str(e).splitlines()[0]
    record_property("te_refuses_without_the_variable", refused)
    # ... megarope refuses a copy of it that someone shares, before reading it, unless the user opts in ...
    shared = str(tmp_path / "shared")
    shutil.copytree(first["checkpoint"], shared)
    fp8 = {"backend": "te", "dtype": torch.bfloat16, "fp8": "hybrid", "fp8_recipe": "delayed"}
    with pytest.raises(UsageError) as foreign:
        checkpoint.build_from_checkpoint(shared, **fp8)
    record_property("a_foreign_copy_is_refused", str(foreign.value))
    assert "\n" not in str(foreign.value) and "FP8 delayed-scaling state" in str(foreign.value)
    assert str(foreign.value).endswith(f"--trust-checkpoint (or {trust.TE_UNSAFE_PICKLE}=1)")
    opted_in = checkpoint.build_from_checkpoint(shared, trust=trust.chosen(True), **fp8)
    scaling = [m.fp8_meta["scaling_fwd"] for m in opted_in.modules() if "scaling_fwd" in getattr(m, "fp8_meta", {})]
    # its state arrived: a fresh layer's scales are 1 and its amax history 0
    assert scaling and any(s.scale.ne(1).any() or s.amax_history.ne(0).any() for s in scaling)
    parallel.destroy()
    # ... and the run's own resume loads it
    rest = train.run(train_config(root, toy_data_dir, fp8="hybrid", fp8_recipe="delayed", steps=2))
    assert rest["step"] == 2 and rest["loss"] is not None
    assert os.environ.get(trust.TE_UNSAFE_PICKLE) is None and os.environ.get(trust.FORCE_WEIGHTS_ONLY) is None


@pytest.mark.parametrize("overrides", [
    pytest.param(dict(fp8_recipe="mxfp8"), id="mxfp8-on-hopper",
                 marks=pytest.mark.skipif(not HOPPER, reason="Hopper only: newer GPUs run MXFP8")),
    pytest.param(dict(seq_len=12, micro_batch=1), id="12-tokens-per-micro-batch"),  # FP8 wants multiples of 8
])
def test_what_fp8_cannot_run_is_refused_in_one_line_before_anything_is_written(tmp_path, toy_data_dir, overrides):
    root = tmp_path / "refused"
    with pytest.raises(UsageError) as error:
        train.run(train_config(str(root), toy_data_dir, fp8="hybrid", steps=1, **overrides))
    assert "\n" not in str(error.value)
    assert not root.exists() or not any(root.iterdir())

"""Transformer Engine backend on a GPU. Skipped where CUDA or TE is missing (every CPU machine).

Run on a GPU machine with TE installed: `python -m pytest -q tests/gpu`.
"""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
    reason="needs a CUDA GPU and Transformer Engine",
)


def _logits(backend, rope, directory=None, **kwargs):
    from megarope import checkpoint, parallel
    from megarope.model import build_model, get_preset

    parallel.init()
    model = build_model(get_preset("toy", max_seq_len=1024), rope, backend, **kwargs)
    if directory is not None:
        checkpoint.load_model(model, directory)
    tokens = torch.randint(0, 257, (2, 1024), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(1024, device="cuda").expand(2, -1)
    with torch.no_grad():
        return model, model(tokens, positions, None)[..., :257].float()


@pytest.mark.parametrize("rope_kwargs", [dict(base=1e6), dict(base=500.0, log_scale_ref=256, dynamic_ntk=True)])
def test_te_backend_matches_local_backend(tmp_path, rope_kwargs):
    from megarope import checkpoint, parallel
    from megarope.rope import RopeConfig

    rope = RopeConfig(train_len=256, **rope_kwargs)
    local, expected = _logits("local", rope)
    checkpoint.save_model(local, str(tmp_path / "ck"))
    parallel.destroy()
    _, got = _logits("te", rope, str(tmp_path / "ck"))
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


def test_fp8_training_step_runs():
    from megarope import loss as L
    from megarope import parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

    parallel.init()
    model = build_model(get_preset("toy", hidden_size=256, ffn_hidden_size=768, num_heads=8), RopeConfig(base=1e6),
                        "te", dtype=torch.bfloat16, fp8="hybrid")
    tokens = torch.randint(0, 257, (2, 513), device="cuda")  # 512 inputs: FP8 GEMMs want multiples of 16
    losses, _ = L.token_losses(model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    loss, _ = L.mean_loss(losses, torch.ones_like(losses))
    loss.backward()
    assert torch.isfinite(loss)

"""The chunked loss: equal to the loss over full logits, the same without accuracy, bf16 close to fp32,
and no tensor value read on the host (on a GPU each such read waits for the device)."""

import pytest
import torch
import torch.nn.functional as F

from megarope import loss as L
from megarope import parallel
from megarope.model import build_model, get_preset
from megarope.rope import RopeConfig

SEQ = 96


def _model(dtype=torch.float32):
    parallel.seed_everything(3)
    return build_model(get_preset("toy"), RopeConfig(base=1e4, train_len=SEQ), "local", dtype=dtype)


def _batch():
    tokens = torch.randint(0, 257, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


@pytest.fixture
def world():
    parallel.init()
    yield


def test_chunked_loss_equals_full_logits_over_the_true_vocab(world):
    model = _model()
    tokens, labels = _batch()
    losses, correct = L.token_losses(model, tokens, labels, chunk=40)  # chunks of 40, 40 and 16 tokens
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand_as(tokens), None)[..., :257]  # padded vocab: 384
    expected = F.cross_entropy(logits.reshape(-1, 257), labels.reshape(-1), reduction="none").view_as(labels)
    torch.testing.assert_close(losses.detach(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(correct, logits.argmax(-1) == labels)


def test_without_accuracy_the_losses_and_gradients_are_the_same(world):
    model = _model()
    tokens, labels = _batch()
    results = []
    for with_accuracy in (True, False):
        model.zero_grad(set_to_none=True)
        losses, correct = L.token_losses(model, tokens, labels, chunk=40, with_accuracy=with_accuracy)
        assert (correct is not None) == with_accuracy
        L.mean_loss(losses, torch.ones_like(losses))[0].backward()
        results.append((losses.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)


def test_bf16_model_loss_is_fp32_and_close_to_the_fp32_reference(world):
    reference = _model()
    model = _model(torch.bfloat16)
    model.load_state_dict(reference.state_dict())  # the same weights, rounded to bf16
    tokens, labels = _batch()
    with torch.no_grad():
        expected, _ = L.token_losses(reference, tokens, labels, with_accuracy=False)
        got, _ = L.token_losses(model, tokens, labels, with_accuracy=False)
    assert got.dtype == torch.float32
    assert abs(got.mean().item() - expected.mean().item()) < 0.02 * expected.mean().item()
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


def test_a_training_forward_and_backward_reads_no_tensor_value_on_the_host(world, monkeypatch):
    """`.item()`, `bool(t)`, `.tolist()` on a GPU tensor each wait for the device: none in a training step
    (the old `if padded.any()` per loss chunk was one)."""
    model = _model()
    tokens, labels = _batch()

    def host_read(*_, **__):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "__bool__", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    losses, _ = L.token_losses(model, tokens, labels, chunk=40, with_accuracy=False)
    L.mean_loss(losses, torch.ones_like(losses))[0].backward()
    monkeypatch.undo()
    assert losses.shape == labels.shape

"""The loss's three paths (full logits, chunked with recompute, scoring without autograd): equal to the loss
over full logits and to each other in losses, gradients and correctness (one process, and TP 2 with and
without sequence parallelism and CP 2 in two), the GEMMs each runs, the same without accuracy, bf16 close
to fp32, and no tensor value read on the host (on a GPU each such read waits for the device)."""

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("full_logits", [True, False], ids=["full", "chunked"])
def test_a_training_forward_and_backward_reads_no_tensor_value_on_the_host(world, monkeypatch, full_logits):
    """`.item()`, `bool(t)`, `.tolist()` on a GPU tensor each wait for the device: none in a training step
    (the old `if padded.any()` per loss chunk was one), nor in scoring."""
    model = _model()
    tokens, labels = _batch()

    def host_read(*_, **__):
        raise AssertionError("a tensor value was read on the host")

    for name in ("item", "__bool__", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    losses, _ = L.token_losses(model, tokens, labels, chunk=40, with_accuracy=False, full_logits=full_logits)
    L.mean_loss(losses, torch.ones_like(losses))[0].backward()
    with torch.inference_mode():
        scored, _ = L.token_losses(model, tokens, labels, chunk=40, full_logits=full_logits)
    monkeypatch.undo()
    assert losses.shape == scored.shape == labels.shape


def _losses_and_grads(model, tokens, labels, positions=None, **kwargs):
    model.zero_grad(set_to_none=True)
    losses, correct = L.token_losses(model, tokens, labels, positions, **kwargs)
    L.mean_loss(losses, torch.ones_like(losses))[0].backward()
    return losses.detach(), correct, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_full_logits_chunked_and_scoring_give_the_same_losses_gradients_and_correctness(world):
    """The toy vocabulary (257) is padded to 384: the padding rows are left out of the softmax in all three."""
    model = _model()
    tokens, labels = _batch()
    full = _losses_and_grads(model, tokens, labels, full_logits=True)
    chunked = _losses_and_grads(model, tokens, labels, chunk=40)
    with torch.inference_mode():
        scored = L.token_losses(model, tokens, labels, chunk=40)
    with torch.no_grad():
        logits = model(tokens, torch.arange(SEQ).expand_as(tokens), None)[..., :257]
    expected = F.cross_entropy(logits.reshape(-1, 257), labels.reshape(-1), reduction="none").view_as(labels)
    for losses, correct in (full[:2], chunked[:2], scored):
        torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(correct, logits.argmax(-1) == labels)
    for name, grad in full[2].items():
        torch.testing.assert_close(grad, chunked[2][name], atol=1e-7, rtol=1e-5, msg=name)


class _OutputGemms(TorchDispatchMode):
    """Counts the matrix products that involve the (padded) vocabulary dimension: the output layer's."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.calls = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            if any(self.vocab in shape for shape in shapes):
                self.calls.append((func.__name__, out.data_ptr()))
        return out


@pytest.mark.parametrize("full_logits, chunk, gemms", [(True, 40, 3), (False, 40, 4 * 3), (False, 4096, 4)],
                         ids=["full", "chunked-3", "chunked-1"])
def test_the_full_path_runs_the_output_gemm_once_forward_and_twice_backward(world, full_logits, chunk, gemms):
    """Full logits: forward, then the input and the weight gradient. Chunked: per chunk, the forward, its
    recompute in the backward pass, and the two gradients."""
    model = _model()
    tokens, labels = _batch()
    with _OutputGemms(model.megarope_preset.padded_vocab_size) as counted:
        _losses_and_grads(model, tokens, labels, chunk=chunk, with_accuracy=False, full_logits=full_logits)
    assert len(counted.calls) == gemms, counted.calls


def test_scoring_writes_every_chunk_into_one_buffer(world):
    model = _model()
    tokens, labels = _batch()
    with torch.inference_mode(), _OutputGemms(model.megarope_preset.padded_vocab_size) as counted:
        L.token_losses(model, tokens, labels, chunk=40)
    assert [name for name, _ in counted.calls] == ["mm.out"] * 3
    assert len({pointer for _, pointer in counted.calls}) == 1


def _full_and_chunked_in_layouts():
    """On 2 ranks: the full path's losses and gradients against the chunked path's at TP 2 with and without
    sequence parallelism and at CP 2 (each rank compares its own shard)."""
    out = {}
    for name, layout in {"tp2-sp": dict(tp=2, sp=True), "tp2": dict(tp=2), "cp2": dict(cp=2)}.items():
        parallel.init(tp=layout.get("tp", 1), cp=layout.get("cp", 1))
        parallel.seed_everything(3)
        model = build_model(get_preset("toy"), RopeConfig(base=1e4, train_len=SEQ), "local",
                            sequence_parallel=layout.get("sp", False))
        tokens, labels = _batch()
        batch = parallel.slice_for_cp({"tokens": tokens, "labels": labels,
                                       "position_ids": torch.arange(SEQ).expand_as(tokens).contiguous()})
        args = (model, batch["tokens"], batch["labels"], batch["position_ids"])
        full, chunked = _losses_and_grads(*args, full_logits=True), _losses_and_grads(*args, chunk=20)
        with torch.inference_mode():
            scored = L.token_losses(*args, chunk=20)
        grad_diff = max(float((g - chunked[2][n]).abs().max()) for n, g in full[2].items())
        out[name] = {"loss": float((full[0] - chunked[0]).abs().max()), "scored": float((scored[0] - full[0]).abs().max()),
                     "correct": bool(torch.equal(full[1], chunked[1]) and torch.equal(scored[1], full[1])),
                     "grad": grad_diff, "tokens": int(full[0].numel())}
    return out


@pytest.mark.slow
def test_full_and_chunked_agree_under_tp_sequence_parallel_and_cp():
    for rank in run_distributed(_full_and_chunked_in_layouts, 2):
        for name, r in rank.items():
            assert r["loss"] < 1e-5 and r["scored"] < 1e-5 and r["correct"], (name, r)
            assert r["grad"] < 1e-6, (name, r)
        assert rank["cp2"]["tokens"] == 2 * SEQ // 2 and rank["tp2"]["tokens"] == 2 * SEQ

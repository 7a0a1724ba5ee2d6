"""The shared scoring core: the chunked loss and MLP equal the full-logits loss, CP=2 scores equal CP=1
(plain, log-scaled, dynamic NTK), sliding windows, and the length checks."""

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed
from eval_helpers import corpus_texts, save_toy_checkpoint

from megarope import checkpoint, data, loss, parallel
from megarope.errors import UsageError
from megarope.eval import documents, scoring
from megarope.model import build_model, get_preset
from megarope.rope import RopeConfig


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt")


def test_check_lengths():
    assert scoring.check_lengths([1024, 256, 256], tp=1, cp=2) == [256, 1024]
    with pytest.raises(UsageError, match=r"length 1022 is not divisible by 2\*CP\*TP = 8"):
        scoring.check_lengths([1022], tp=2, cp=2)
    with pytest.raises(UsageError, match="window 100 is not divisible"):
        scoring.check_lengths([100], tp=1, cp=4, what="window")
    with pytest.raises(UsageError, match="no lengths"):
        scoring.check_lengths([], 1, 1)


@pytest.mark.parametrize("length,window,stride", [(1024, 256, None), (1000, 256, 100), (512, 512, None),
                                                  (300, 64, 63), (256, 1024, None)])
def test_window_plan_scores_every_target_once_with_bounded_context(length, window, stride):
    plan = scoring.window_plan(length, window, stride)
    scored = []
    for start, first in plan:
        end = min(start + window, length)
        targets = list(range(first, end))
        assert all(1 <= t - start <= window - 1 for t in targets)  # context: tokens start..t-1
        if start > 0:
            assert all(t - start >= window - (stride or window // 2) for t in targets)
        scored += targets
    assert scored == list(range(1, length))


def test_chunked_loss_equals_full_logits():
    parallel.init()
    preset = get_preset("toy", max_seq_len=1024)
    model = build_model(preset, RopeConfig(base=10000, train_len=128))
    model.eval()
    tokens = torch.randint(0, preset.vocab_size, (2, 1024), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(1024).expand(2, -1)
    with torch.no_grad():
        logits = model(tokens, positions, None)[..., :preset.vocab_size]  # the padded vocab rows are not tokens
        full = F.cross_entropy(logits.reshape(-1, preset.vocab_size), labels.reshape(-1), reduction="none").view(2, -1)
        chunked, correct = loss.token_losses(model, tokens, labels, positions, chunk=300)
    assert logits.shape[-1] < model.megarope_preset.padded_vocab_size
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(correct, logits.argmax(-1) == labels)
    fc1_rows = []  # the chunked MLP really runs in chunks
    hook = model.decoder.layers[0].mlp.linear_fc1.register_forward_hook(lambda m, i, o: fc1_rows.append(i[0].shape[0]))
    lo, ok = scoring.score_sequences(model, tokens, chunk=300, mlp_chunk=100)
    hook.remove()
    assert fc1_rows == [100] * 10 + [24]
    torch.testing.assert_close(lo, full[:, :-1], rtol=1e-5, atol=1e-5)
    assert torch.equal(ok, correct[:, :-1])
    assert "forward" not in vars(model.decoder.layers[0].mlp)  # the patch is undone


CP_VARIANTS = (("plain", {}), ("log-scaled", {"log_scale_ref": 512}), ("dynamic-ntk", {"dynamic_ntk": True}))


def _score_cp_and_cp1(seq_len):
    """Each RoPE variant: per-position loss under CP=2 (both ranks, gathered), then the same weights
    under CP=1 (the two processes as DP=2; the references are shared out between the ranks)."""
    import torch.distributed as dist

    preset = get_preset("toy", max_seq_len=seq_len, num_layers=2)
    tokens = torch.randint(0, preset.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    out, states = {}, {}
    parallel.init(cp=2)
    for name, extra in CP_VARIANTS:
        model = build_model(preset, RopeConfig(base=10000, train_len=512, **extra))
        out[name] = scoring.score_sequences(model, tokens)
        states[name] = model.state_dict()
    parallel.init(cp=1)
    for k, (name, extra) in enumerate(CP_VARIANTS):
        if k % 2 == dist.get_rank():
            model = build_model(preset, RopeConfig(base=10000, train_len=512, **extra))
            model.load_state_dict(states[name])
            out[name] += scoring.score_sequences(model, tokens)
    return out


@pytest.mark.slow  # 18-26 s on the shared 2-core machine, most of it starting two processes
def test_cp2_equals_cp1_16k():
    results = run_distributed(_score_cp_and_cp1, 2, 16384)
    means = {}
    for k, (name, _) in enumerate(CP_VARIANTS):
        loss2, correct2, loss1, correct1 = results[k % 2][name]
        assert loss2.shape == (1, 16383)
        torch.testing.assert_close(results[1 - k % 2][name][0], loss2, rtol=0, atol=0)  # both ranks hold it all
        rel = abs(loss2.double().mean() - loss1.double().mean()) / loss1.double().mean()
        assert rel <= 1e-5, (name, float(rel))
        assert (loss2 - loss1).abs().max() < 1e-3, name
        assert (correct2 != correct1).float().mean() < 1e-3, name
        means[name] = float(loss1.double().mean())
    # the variants really change something at 16K (far past train_len 512)
    assert means["plain"] != means["log-scaled"] and means["plain"] != means["dynamic-ntk"]


def test_window_scores_match_direct_scoring(toy_ckpt):
    parallel.init()
    model = checkpoint.build_from_checkpoint(toy_ckpt)
    ids = documents.tokenize(corpus_texts()[:1], data.load_tokenizer("bytes"), 512)[0]
    loss_, _ = scoring.score_windowed(model, ids, 128, 32)
    direct, _ = scoring.score_sequences(model, ids[None, 384:512])  # the last window: start 384
    torch.testing.assert_close(loss_[-32:], direct[0, -32:], rtol=1e-5, atol=1e-6)
    first, _ = scoring.score_sequences(model, ids[None, :128])
    torch.testing.assert_close(loss_[:127], first[0], rtol=1e-5, atol=1e-6)

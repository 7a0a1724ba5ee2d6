"""Long-context evaluation: CP=2 scores equal CP=1 (plain, log-scaled, dynamic NTK), the chunked loss
equals the full-logits loss, `megarope eval` of a converted HF LLaMA equals transformers' perplexity,
the sliding window, the outputs, the memory estimate, and one-line errors for bad input."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "megarope"]


def save_toy_checkpoint(path, base=10000.0, train_len=128, **preset_overrides):
    """A random-init toy model saved as a megarope checkpoint that records the "bytes" tokenizer."""
    from megarope import checkpoint, parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

    parallel.init()
    try:
        model = build_model(get_preset("toy", **preset_overrides), RopeConfig(base=base, train_len=train_len))
        checkpoint.save_model(model, str(path), checkpoint.model_meta(model, tokenizer="bytes"))
    finally:
        parallel.destroy()
    return str(path)


def corpus_texts():
    """Real text of known sizes (bytes = tokens with the byte tokenizer): a few stdlib modules + a short doc."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in ("argparse.py", "inspect.py", "typing.py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            texts.append(f.read()[:20000])
    return texts + ["a short document"]


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with open(path, "w") as f:
        for text in corpus_texts():
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------------- pure logic
def test_variants():
    from megarope.errors import UsageError
    from megarope.evaluate import parse_variant, variants_from_flags

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


@pytest.mark.parametrize("length,window,stride", [(1024, 256, None), (1000, 256, 100), (512, 512, None),
                                                  (300, 64, 63), (256, 1024, None)])
def test_window_plan_scores_every_target_once_with_bounded_context(length, window, stride):
    from megarope.evaluate import window_plan

    plan = window_plan(length, window, stride)
    scored = []
    for start, first in plan:
        end = min(start + window, length)
        targets = list(range(first, end))
        assert all(1 <= t - start <= window - 1 for t in targets)  # context: tokens start..t-1
        if start > 0:
            assert all(t - start >= window - (stride or window // 2) for t in targets)
        scored += targets
    assert scored == list(range(1, length))


def test_buckets_and_summary():
    from megarope.evaluate import bucket_edges, summarize

    assert bucket_edges(1024, 128) == [0, 128, 256, 512, 1024]
    assert bucket_edges(1000, 128) == [0, 128, 256, 512, 1000]
    assert bucket_edges(100, 128) == [0, 100]
    loss = torch.arange(1, 1024, dtype=torch.float64)  # position t-1 has loss t, summed over 2 docs
    s = summarize(2 * loss, torch.full((1023,), 2.0, dtype=torch.float64), n_docs=2, bucket0=128)
    assert s["n_tokens"] == 2 * 1023 and s["accuracy"] == 1.0
    assert s["loss"] == pytest.approx(512.0)
    assert [(b["start"], b["end"]) for b in s["buckets"]] == [(0, 128), (128, 256), (256, 512), (512, 1024)]
    assert s["buckets"][0]["loss"] == pytest.approx(64.0) and s["buckets"][0]["n_tokens"] == 2 * 127
    assert s["buckets"][-1]["loss"] == pytest.approx((512 + 1023) / 2)


def test_measured_break():
    import math

    from megarope.evaluate import measured_break

    assert measured_break([1.0] * 1023, 128) is None
    jump = [1.0] * 1150 + [3.0] * 1000  # a cliff of 2 nats at target 1151
    assert 1100 <= measured_break(jump, 128) <= 1160
    assert measured_break(jump, 128, rise=2.5) is None
    # smooth degradation: +0.5 nats per octave, 3 nats above the in-length level by 8K, never a cliff
    smooth = [1.0 if t <= 128 else 1.0 + 0.5 * math.log2(t / 128) for t in range(1, 8192)]
    assert measured_break(smooth, 128) is None
    # the same slow rise with a cliff on top is still found
    assert 1050 <= measured_break([x + (2.0 if t >= 1150 else 0.0) for t, x in enumerate(smooth)], 128) <= 1160


def test_memory_estimate():
    from megarope.evaluate import estimate_eval_memory
    from megarope.model import get_preset

    one_b = get_preset("llama-1b")
    est = estimate_eval_memory(one_b, 2**20, 2)
    assert 20e9 < est["peak"] < 0.8 * 80e9  # 1M tokens fit one 80 GB GPU with room to spare
    assert est["weights"] == pytest.approx(2.2e9, rel=0.05)
    unchunked = estimate_eval_memory(one_b, 2**20, 2, mlp_chunk=None)
    assert unchunked["mlp"] > 50e9 > est["mlp"]  # why score_sequences chunks the MLP
    for length in (2**14, 2**17, 2**20):  # linear in length: activations dominate, nothing is quadratic
        a = estimate_eval_memory(one_b, length, 2)
        b = estimate_eval_memory(one_b, 2 * length, 2)
        assert b["peak"] <= 2.1 * a["peak"]
    assert estimate_eval_memory(one_b, 2**20, 2, cp=8)["peak"] < est["peak"] / 2.5


# ----------------------------------------------------------------------------------------------- model
def test_chunked_loss_equals_full_logits():
    from megarope import evaluate, loss, parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

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
    lo, ok = evaluate.score_sequences(model, tokens, chunk=300, mlp_chunk=100)
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

    from megarope import evaluate, parallel
    from megarope.model import build_model, get_preset
    from megarope.rope import RopeConfig

    preset = get_preset("toy", max_seq_len=seq_len, num_layers=2)
    tokens = torch.randint(0, preset.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    out, states = {}, {}
    parallel.init(cp=2)
    for name, extra in CP_VARIANTS:
        model = build_model(preset, RopeConfig(base=10000, train_len=512, **extra))
        out[name] = evaluate.score_sequences(model, tokens)
        states[name] = model.state_dict()
    parallel.init(cp=1)
    for k, (name, extra) in enumerate(CP_VARIANTS):
        if k % 2 == dist.get_rank():
            model = build_model(preset, RopeConfig(base=10000, train_len=512, **extra))
            model.load_state_dict(states[name])
            out[name] += evaluate.score_sequences(model, tokens)
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


def test_run_in_process(toy_ckpt, tmp_path):
    from megarope import evaluate

    texts = corpus_texts()
    out = tmp_path / "out"
    records = evaluate.run([toy_ckpt], texts, [256, 1024], ["as-trained", "dynamic-ntk"], str(out), verbose=False)
    assert [(r["run"], r["length"]) for r in records] == [("ckpt:as-trained", 256), ("ckpt:as-trained", 1024),
                                                          ("ckpt:dynamic-ntk", 256), ("ckpt:dynamic-ntk", 1024)]
    for r in records:
        assert r["n_docs"] == 3 and r["n_skipped"] == 1 and r["n_tokens"] == 3 * (r["length"] - 1)
        assert r["ppl"] == pytest.approx(math.exp(r["loss"])) and 0 <= r["accuracy"] <= 1
        assert r["base"] == 10000 and r["predicted_bound"] is not None
        assert sum(b["n_tokens"] for b in r["buckets"]) == r["n_tokens"]
        assert sum(b["loss"] * b["n_tokens"] for b in r["buckets"]) / r["n_tokens"] == pytest.approx(r["loss"])
    assert records[2]["effective_base"] > 10000 and records[0]["effective_base"] == 10000
    for name in ("results.json", "results.csv", "ppl_vs_length.png", "loss_by_position.png"):
        assert (out / name).stat().st_size > 0
    assert len(json.loads((out / "results.json").read_text())) == 4
    assert (out / "results.csv").read_text().count("\n") == 5

    # max_docs keeps the first N long enough; positions adds the per-position mean loss
    one = evaluate.run([toy_ckpt], texts, [256], max_docs=1, positions=True, verbose=False)
    assert one[0]["n_docs"] == 1 and one[0]["n_skipped"] == 1
    assert len(one[0]["position_loss"]) == 255
    assert sum(one[0]["position_loss"]) / 255 == pytest.approx(one[0]["loss"])
    assert "position_loss" not in records[0]

    # sliding window: W >= L is the full sequence; W < L gives every token at most W tokens of context
    same = evaluate.run([toy_ckpt], texts, [256], window=256, verbose=False)
    assert same[0]["loss"] == pytest.approx(records[0]["loss"], rel=1e-6)
    windowed = evaluate.run([toy_ckpt], texts, [1024], window=256, stride=64, verbose=False)
    assert windowed[0]["window"] == 256 and windowed[0]["stride"] == 64
    assert windowed[0]["n_tokens"] == 3 * 1023
    assert windowed[0]["buckets"][0]["loss"] == pytest.approx(records[1]["buckets"][0]["loss"], rel=1e-5)


def test_window_scores_match_direct_scoring(toy_ckpt):
    from megarope import checkpoint, data, evaluate, parallel

    parallel.init()
    model = checkpoint.build_from_checkpoint(toy_ckpt)
    ids = evaluate.tokenize(corpus_texts()[:1], data.load_tokenizer("bytes"), 512)[0]
    loss, correct = evaluate.score_windowed(model, ids, 128, 32)
    direct, _ = evaluate.score_sequences(model, ids[None, 384:512])  # the last window: start 384
    torch.testing.assert_close(loss[-32:], direct[0, -32:], rtol=1e-5, atol=1e-6)
    first, _ = evaluate.score_sequences(model, ids[None, :128])
    torch.testing.assert_close(loss[:127], first[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- CLI
def _cli(*args, cwd=REPO, **kwargs):
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def test_eval_cli_matches_transformers(tmp_path):
    """`megarope eval` of a converted random tiny HF LLaMA == exp(transformers' loss), per length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megarope import convert, parallel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128,
                         rope_theta=500.0, tie_word_embeddings=False, dtype="float32", attn_implementation="eager")
    hf = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # weights large enough that the perplexity is far from uniform
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    try:
        convert.hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "mcore"))
    finally:
        parallel.destroy()
    text = corpus_texts()[0]
    (tmp_path / "doc.txt").write_text(text)
    r = _cli("eval", "--checkpoint", str(tmp_path / "mcore"), "--tokenizer", "bytes", "--data",
             str(tmp_path / "doc.txt"), "--lengths", "128,512", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "mcore:as-trained" in r.stdout
    got = {rec["length"]: rec for rec in json.loads((tmp_path / "out" / "results.json").read_text())}
    ids = torch.tensor(list(text.encode("utf-8")))
    for length in (128, 512):
        with torch.no_grad():
            out = hf(ids[None, :length], labels=ids[None, :length])
        expected = math.exp(out.loss.item())
        assert got[length]["ppl"] == pytest.approx(expected, rel=1e-4), length
        accuracy = (out.logits[0, :-1].argmax(-1) == ids[1:length]).float().mean().item()
        assert got[length]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert abs(math.log(got[128]["ppl"]) - math.log(384)) > 0.1  # far from uniform: the comparison means something
    # the converted checkpoint's scaling-law inputs: pretraining length = max_position_embeddings, base 500
    assert got[128]["pretrain_len"] == 128 and got[128]["base"] == 500


def test_bad_inputs_one_line_exit_2(toy_ckpt, data_file, tmp_path):
    small_vocab = str(tmp_path / "small_vocab")  # the tokenizer is checked before any weight is read
    shutil.copytree(toy_ckpt, small_vocab)
    meta = json.loads((tmp_path / "small_vocab" / "megarope.json").read_text())
    meta["preset"]["vocab_size"] = 200
    (tmp_path / "small_vocab" / "megarope.json").write_text(json.dumps(meta))
    longest = max(len(t.encode()) for t in corpus_texts())
    common = ["--data", data_file, "--out", str(tmp_path / "out")]
    cases = {
        "length above every document": (["--checkpoint", toy_ckpt, "--lengths", f"256,{2 * (longest // 2 + 1)}"],
                                        "longer than every document"),
        "unknown checkpoint": (["--checkpoint", str(tmp_path / "nope"), "--lengths", "256"],
                               "not a megarope checkpoint"),
        "length not divisible by 2*CP*TP": (["--checkpoint", toy_ckpt, "--lengths", "1022", "--cp", "2", "--tp", "2"],
                                            "not divisible by 2*CP*TP = 8"),
        "tokenizer larger than the model's vocab": (["--checkpoint", small_vocab, "--lengths", "256"],
                                                    "not this model's tokenizer"),
        "tokenizer other than the recorded one": (["--checkpoint", toy_ckpt, "--lengths", "256", "--tokenizer",
                                                   str(tmp_path / "missing.model")], "tokenizer not found"),
        "missing data": (["--checkpoint", toy_ckpt, "--lengths", "256", "--data", str(tmp_path / "none.jsonl")],
                         "not found"),
    }
    procs = {name: subprocess.Popen([*CLI, "eval", *common, *args], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (args, _) in cases.items()}
    failures = []
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or cases[name][1] not in lines[0] or stdout.strip():
            failures.append(f"{name}: rc {proc.returncode}, stderr {stderr!r}")
    assert not failures, "\n".join(failures)


def test_run_api_bad_inputs(toy_ckpt, tmp_path):
    """The in-process API refuses what the CLI refuses (the CLI checks some before importing torch)."""
    from megarope import evaluate
    from megarope.errors import UsageError

    texts = corpus_texts()
    bad = [dict(checkpoints=[str(tmp_path / "nope")], lengths=[256]),
           dict(checkpoints=[toy_ckpt], lengths=[1022], tp=2, cp=2),
           dict(checkpoints=[toy_ckpt], lengths=[256], window=100, cp=2),
           dict(checkpoints=[toy_ckpt], lengths=[256], window=64, stride=64),
           dict(checkpoints=[toy_ckpt], lengths=[256], variants=["bogus"]),
           dict(checkpoints=[toy_ckpt], lengths=[40000])]
    for kwargs in bad:
        with pytest.raises(UsageError):
            evaluate.run(docs_or_paths=texts, verbose=False, **kwargs)


@pytest.mark.slow
def test_torchrun_cp2_cli_equals_plain(toy_ckpt, data_file, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ["--checkpoint", toy_ckpt, "--data", data_file, "--lengths", "512,2K", "--variants", "as-trained,log-scaled"]
    plain = _cli("eval", *args, "--out", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = subprocess.Popen([torchrun, "--nproc-per-node", "2", "--master-port", port, "-m", "megarope", "eval", *args,
                             "--cp", "2", "--out", str(tmp_path / "cp2")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, not only torchrun
        raise
    assert proc.returncode == 0, stderr
    a = json.loads((tmp_path / "plain" / "results.json").read_text())
    b = json.loads((tmp_path / "cp2" / "results.json").read_text())
    assert [(r["run"], r["length"]) for r in a] == [(r["run"], r["length"]) for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["n_docs"] == x["n_docs"] and y["n_skipped"] == x["n_skipped"]
    assert stdout.count("perplexity") == 1  # rank 0 alone reports


@pytest.mark.parametrize("dynamic_ntk", [False, True])
def test_several_lengths_in_one_pass_equal_length_by_length(toy_ckpt, dynamic_ntk):
    """Causal attention: a prefix of a longer read scores what the truncated document scores."""
    from megarope import checkpoint, evaluate, parallel

    parallel.init()
    model = checkpoint.build_from_checkpoint(toy_ckpt, rope_overrides={"dynamic_ntk": dynamic_ntk})
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 257, (n,), generator=g) for n in (600, 256, 1024, 300)]
    lengths = [128, 256, 512, 1024]
    together = evaluate.evaluate_model(model, docs, lengths, max_docs=2, positions=True)
    for rec in together:
        alone = evaluate.evaluate_model(model, docs, [rec["length"]], max_docs=2, positions=True)[0]
        assert (rec["n_docs"], rec["n_skipped"]) == (alone["n_docs"], alone["n_skipped"])
        assert rec["loss"] == pytest.approx(alone["loss"], rel=1e-5)
        assert rec["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-9)
        assert rec["position_loss"] == pytest.approx(alone["position_loss"], rel=1e-4, abs=1e-5)

"""Perplexity against length: the run's records and files, results written as each (run, length)
completes and a rerun that skips them, `megarope eval` of a converted HF LLaMA equal to transformers'
perplexity, CP=2 under torchrun equal to one process, several lengths in one pass, one-line errors."""

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
from eval_helpers import CLI, REPO, corpus_texts, save_toy_checkpoint, scored_again, sigterm_once_written

from megarope.eval import perplexity, runs


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


def test_run_in_process(toy_ckpt, tmp_path):
    texts = corpus_texts()
    out = tmp_path / "out"
    records = perplexity.run([toy_ckpt], texts, [256, 1024], ["as-trained", "dynamic-ntk"], str(out), verbose=False)
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
    one = perplexity.run([toy_ckpt], texts, [256], max_docs=1, positions=True, verbose=False)
    assert one[0]["n_docs"] == 1 and one[0]["n_skipped"] == 1
    assert len(one[0]["position_loss"]) == 255
    assert sum(one[0]["position_loss"]) / 255 == pytest.approx(one[0]["loss"])
    assert "position_loss" not in records[0]

    # sliding window: W >= L is the full sequence; W < L gives every token at most W tokens of context
    same = perplexity.run([toy_ckpt], texts, [256], window=256, verbose=False)
    assert same[0]["loss"] == pytest.approx(records[0]["loss"], rel=1e-6)
    windowed = perplexity.run([toy_ckpt], texts, [1024], window=256, stride=64, verbose=False)
    assert windowed[0]["window"] == 256 and windowed[0]["stride"] == 64
    assert windowed[0]["n_tokens"] == 3 * 1023
    assert windowed[0]["buckets"][0]["loss"] == pytest.approx(records[1]["buckets"][0]["loss"], rel=1e-5)


# ----------------------------------------------------------------------------------------------- CLI
def _cli(*args, cwd=REPO, **kwargs):
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def test_eval_cli_matches_transformers(tmp_path):
    """`megarope eval` of a converted random tiny HF LLaMA with its own BPE tokenizer (trained in the test;
    300 tokens, the model's vocabulary padded to 384) == exp(transformers' loss), per length."""
    from hf_models import random_hf

    from megarope import convert, data, parallel

    hf = random_hf(tmp_path / "hf", "llama", tokenizer="llama3", rope_theta=500.0)
    try:
        convert.hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "mcore"))
    finally:
        parallel.destroy()
    text = corpus_texts()[0]
    (tmp_path / "doc.txt").write_text(text)
    r = _cli("eval", "--checkpoint", str(tmp_path / "mcore"), "--data", str(tmp_path / "doc.txt"),
             "--lengths", "128,512", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "mcore:as-trained" in r.stdout
    got = {rec["length"]: rec for rec in json.loads((tmp_path / "out" / "results.json").read_text())}
    tok = data.load_tokenizer(tmp_path / "hf")
    ids = torch.tensor([tok.bos] + tok.encode(text))  # the checkpoint's tokenizer, BOS first (Llama-3's manner)
    assert got[128]["tokenizer"] == str(tmp_path / "mcore" / "tokenizer") and tok.bos == 0
    for length in (128, 512):
        with torch.no_grad():
            out = hf(ids[None, :length], labels=ids[None, :length])
        expected = math.exp(out.loss.item())
        assert got[length]["ppl"] == pytest.approx(expected, rel=1e-4), length
        accuracy = (out.logits[0, :-1].argmax(-1) == ids[1:length]).float().mean().item()
        assert got[length]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert abs(math.log(got[128]["ppl"]) - math.log(300)) > 0.1  # far from uniform: the comparison means something
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
            perplexity.run(docs_or_paths=texts, verbose=False, **kwargs)


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
    from megarope import checkpoint, parallel

    parallel.init()
    model = checkpoint.build_from_checkpoint(toy_ckpt, rope_overrides={"dynamic_ntk": dynamic_ntk})
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 257, (n,), generator=g) for n in (600, 256, 1024, 300)]
    lengths = [128, 256, 512, 1024]
    together = perplexity.evaluate_model(model, docs, lengths, max_docs=2, positions=True)
    for rec in together:
        alone = perplexity.evaluate_model(model, docs, [rec["length"]], max_docs=2, positions=True)[0]
        assert (rec["n_docs"], rec["n_skipped"]) == (alone["n_docs"], alone["n_skipped"])
        assert rec["loss"] == pytest.approx(alone["loss"], rel=1e-5)
        assert rec["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-9)
        assert rec["position_loss"] == pytest.approx(alone["position_loss"], rel=1e-4, abs=1e-5)


def test_results_are_written_as_each_length_completes_and_a_rerun_skips_them(toy_ckpt, tmp_path, monkeypatch):
    """Length by length (dynamic NTK): results.json holds every finished (run, length) before the next
    starts; a rerun with resume=True evaluates only what is missing and writes the same records."""
    from megarope.eval import scoring

    texts, out = corpus_texts(), tmp_path / "out"
    on_disk, calls = [], []
    score = scoring.score_sequences

    def spy(model, ids, **kwargs):
        calls.append(ids.shape[1])
        path = out / "results.json"
        on_disk.append([(r["run"], r["length"]) for r in json.loads(path.read_text())] if path.exists() else [])
        return score(model, ids, **kwargs)

    monkeypatch.setattr(scoring, "score_sequences", spy)
    args = ([toy_ckpt], texts, [256, 512], ["as-trained", "dynamic-ntk"], str(out))
    first = perplexity.run(*args, verbose=False)
    # dynamic NTK goes length by length: before its 512 pass, its 256 record is already on disk
    assert [("ckpt:as-trained", 256), ("ckpt:as-trained", 512), ("ckpt:dynamic-ntk", 256)] in on_disk

    # an interrupted evaluation: only the first run's records made it to disk
    (out / "results.json").write_text(json.dumps(json.loads((out / "results.json").read_text())[:2]))
    calls.clear()
    again = perplexity.run(*args, resume=True, verbose=False)
    assert calls == [256, 512]  # dynamic-ntk alone: one batch of its 3 documents at 256, then at 512
    assert [(r["run"], r["length"]) for r in again] == [(r["run"], r["length"]) for r in first]
    for a, b in zip(first, again):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert len(json.loads((out / "results.json").read_text())) == 4

    # other settings (a window) make the saved records not reusable: everything is evaluated again
    calls.clear()
    perplexity.run(*args, window=256, resume=True, verbose=False)
    assert 256 in calls and len(calls) > 3


# ----------------------------------------------------------------------------------------------- stop signals
TIMINGS = ("seconds", "tokens_per_s")


def _values(records: list[dict]) -> list[dict]:
    """The records without their timings: what an interrupted and resumed evaluation must reproduce."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_a_signal_stops_before_the_next_batch_and_a_rerun_resumes_what_is_left(toy_ckpt, tmp_path, monkeypatch):
    """SIGTERM during the first batch after a record is on disk: that pass records nothing, Stopped says
    so; resume=None continues with what is left (the interrupted pass again) to the same records."""
    from megarope.eval import scoring
    from megarope.signals import Stopped

    out = tmp_path / "out"
    # batches of 512 tokens: two documents per batch at 256, one at 512
    args = dict(checkpoints=[toy_ckpt], docs_or_paths=corpus_texts(), lengths=[256, 512],
                variants=["dynamic-ntk", "as-trained"], batch_tokens=512, verbose=False)
    reference = perplexity.run(**args)
    score, calls, signalled = scoring.score_sequences, [], []

    def signalled_once_a_record_is_on_disk(model, ids, **kwargs):
        calls.append(ids.shape[1])
        if (out / "results.json").exists() and not signalled:
            signalled.append(os.kill(os.getpid(), signal.SIGTERM))  # in dynamic-ntk's first of 3 batches at 512
        return score(model, ids, **kwargs)

    monkeypatch.setattr(scoring, "score_sequences", signalled_once_a_record_is_on_disk)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match=r"stopped by SIGTERM with 1 of 4 \(run, length\) results done") as e:
        perplexity.run(**args, out_dir=str(out), resume=None)
    assert e.value.exit_code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert calls == [256, 256, 512]  # the batch under way finished; no other started
    assert [(r["run"], r["length"]) for r in perplexity.read_results(str(out))] == [("ckpt:dynamic-ntk", 256)]
    assert json.loads((out / runs.UNFINISHED).read_text())["stopped"] == "SIGTERM"

    calls.clear()
    resumed = perplexity.run(**args, out_dir=str(out), resume=None)
    assert calls == [512] * 6  # dynamic-ntk at 512 again, then as-trained's one pass for both lengths
    assert _values(resumed) == _values(reference)
    assert _values(perplexity.read_results(str(out))) == _values(reference)
    assert not (out / runs.UNFINISHED).exists()

    # a finished evaluation is not resumed, nor an unfinished one of other documents: all is evaluated again
    assert scored_again(lambda: perplexity.run(**args, out_dir=str(out), resume=None), out, calls,
                        {"documents": "others"}) == [8, 8]


@pytest.mark.slow
def test_eval_cli_stops_on_sigterm_with_its_status_and_the_same_command_resumes(toy_ckpt, data_file, tmp_path):
    """`megarope eval`, SIGTERM once its first result is on disk: one line, exit 128 + SIGTERM; the same
    command then finishes, each (run, length) once, equal to an uninterrupted evaluation."""
    out = tmp_path / "out"
    args = ["eval", "--checkpoint", toy_ckpt, "--data", data_file, "--lengths", "512,1K,2K",
            "--variants", "dynamic-ntk,as-trained,base=1e5", "--out", str(out)]
    returncode, stderr = sigterm_once_written(args, out / "results.json")
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    done = json.loads((out / "results.json").read_text())
    assert 1 <= len(done) < 9
    said = [line for line in stderr.splitlines() if line.startswith("megarope")]
    assert said == [f"megarope eval: stopped by SIGTERM with {len(done)} of 9 (run, length) results done (in {out}/"
                    f"results.json); run the same command to resume"]

    rerun = _cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {len(done)} of 9 (run, length) results are in {out}/results.json" in rerun.stdout
    assert json.loads((out / "results.json").read_text())[:len(done)] == done  # kept as written, not evaluated again
    reference = perplexity.run([toy_ckpt], [data_file], [512, 1024, 2048], ["dynamic-ntk", "as-trained", "base=1e5"],
                               verbose=False)
    assert _values(perplexity.read_results(str(out))) == _values(reference)

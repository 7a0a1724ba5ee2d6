"""Passkey retrieval: prompts of exact lengths with the key at the asked depth, deterministic keys,
teacher-forced exact-match scoring, the run's JSON + heatmap, and one-line errors."""

import json
import os
import subprocess
import sys
import sysconfig

import pytest
import torch
from eval_helpers import REPO, save_toy_checkpoint, scored_again


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt")


def _tokenizers(tmp_path):
    from megarope import data
    from megarope.eval import passkey

    text = tmp_path / "sp.txt"
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py")) as f:
        text.write_text(f.read() + "\n" + " ".join(passkey.FILLER) * 20 + "\n" + passkey.INTRO)
    return [data.load_tokenizer("bytes"), data.load_tokenizer(data.train_sentencepiece([text], 400, tmp_path / "sp"))]


def test_prompts(tmp_path):
    from megarope.eval import passkey

    for tok in _tokenizers(tmp_path):
        builder = passkey.PromptBuilder(tok)
        starts = []
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            p = builder.build(512, depth, "48213")
            assert p.tokens.shape == (512,)
            text = tok.decode(p.tokens.tolist())
            assert text.startswith(passkey.INTRO) and text.endswith("What is the pass key? The pass key is 48213")
            assert text.count("48213") == 3
            assert tok.decode(p.tokens[p.answer_start:].tolist()).strip() == "48213"
            assert tok.decode(p.tokens[p.key_start:].tolist()).lstrip().startswith("The pass key is 48213.")
            starts.append(p.key_start)
        assert starts == sorted(starts) and starts[0] < starts[2] < starts[-1]
        n_filler = 512 - builder.overhead("48213")
        assert abs((starts[2] - starts[0]) - n_filler / 2) < 12  # within a sentence of the middle
        if tok.bos is not None:
            assert p.tokens[0] == tok.bos
    from megarope.errors import UsageError

    with pytest.raises(UsageError):
        passkey.PromptBuilder(_tokenizers(tmp_path)[0]).build(64, 0.5, "12345")


def test_keys_are_deterministic_5_digit():
    from megarope.eval.passkey import make_keys

    a = make_keys([256, 512], [0.0, 1.0], 3, seed=0)
    assert a == make_keys([256, 512], [0.0, 1.0], 3, seed=0) != make_keys([256, 512], [0.0, 1.0], 3, seed=1)
    assert len(a) == 12 and all(len(k) == 5 and k.isdigit() for k in a.values())


def test_exact_match_scoring(monkeypatch):
    """A trial passes iff every answer token is the argmax (greedy decoding's verdict); others do not count."""
    from megarope import data
    from megarope.eval import passkey, scoring

    builder = passkey.PromptBuilder(data.load_tokenizer("bytes"))
    prompts = [builder.build(300, 0.5, "12345") for _ in range(3)]
    start = prompts[0].answer_start
    correct = torch.zeros(3, 299, dtype=torch.bool)
    correct[0, start - 1:] = True                # all answer tokens right, nothing else
    correct[1, start - 1:] = True
    correct[1, -1] = False                       # the last digit wrong
    correct[2, :start - 1] = True                # everything but the answer right
    monkeypatch.setattr(scoring, "score_sequences", lambda model, ids, **_: (torch.zeros(3, 299), correct))
    scores = passkey.score_prompts(None, prompts)
    assert [ok for ok, _ in scores] == [True, False, False]
    assert scores[1][1] == pytest.approx(5 / 6) and scores[2][1] == 0  # " 12345": 6 answer tokens


def test_run_writes_json_and_heatmap(toy_ckpt, tmp_path):
    from megarope.eval import passkey

    result = passkey.run(toy_ckpt, [256, 512], [0.0, 0.5, 1.0], trials=2, out_dir=str(tmp_path / "pk"), verbose=False)
    assert result["lengths"] == [256, 512] and result["depths"] == [0.0, 0.5, 1.0]
    assert len(result["accuracy"]) == 3 and all(len(row) == 2 for row in result["accuracy"])
    assert all(0.0 <= a <= 1.0 for row in result["accuracy"] + result["digit_accuracy"] for a in row)
    saved = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert saved["accuracy"] == result["accuracy"] and len(saved["records"]) == 6
    assert (tmp_path / "pk" / "passkey.png").stat().st_size > 0


def test_cli_bad_inputs(toy_ckpt, tmp_path):
    cases = {
        "too short for the prompt": (["--lengths", "64"], "too short"),
        "depth out of range": (["--lengths", "256", "--depths", "0,1.5"], "depths must be in [0, 1]"),
        "not divisible by 2*CP": (["--lengths", "258", "--cp", "4"], "not divisible by 2*CP*TP = 8"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "megarope", "passkey", "--checkpoint", toy_ckpt, *args,
                                     "--out", str(tmp_path / "pk")], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (args, _) in cases.items()}
    failures = []
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or cases[name][1] not in lines[0]:
            failures.append(f"{name}: rc {proc.returncode}, stderr {stderr!r}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------- stop signals
def test_a_signal_stops_before_the_next_batch_and_a_rerun_resumes_the_lengths_left(toy_ckpt, tmp_path, monkeypatch):
    """As `megarope eval` does: SIGTERM during the first batch after a length is on disk; that length's pass
    records nothing, Stopped says so, unfinished.json the signal; resume goes on with what is left, to the
    results of a run that never stopped. A finished run, or one of other settings, is not resumed."""
    import signal

    from megarope.eval import passkey, runs, scoring
    from megarope.signals import Stopped

    out = tmp_path / "pk"
    args = dict(checkpoint=toy_ckpt, lengths=[256, 512, 1024], depths=[0.0, 1.0], trials=2, batch_tokens=512,
                verbose=False)
    reference = passkey.run(**args)
    score, calls, signalled = scoring.score_sequences, [], []

    def signalled_once_a_length_is_on_disk(model, ids, **kwargs):
        calls.append(tuple(ids.shape))
        if (out / "passkey.json").exists() and not signalled:
            signalled.append(os.kill(os.getpid(), signal.SIGTERM))  # in the first of 512's 4 batches
        return score(model, ids, **kwargs)

    monkeypatch.setattr(scoring, "score_sequences", signalled_once_a_length_is_on_disk)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match=rf"stopped by SIGTERM with 1 of 3 lengths done \(in {out}/passkey.json\); "
                                      r"run the same command to resume") as e:
        passkey.run(**args, out_dir=str(out), resume=True)
    assert e.value.exit_code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert calls == [(2, 256), (2, 256), (1, 512)]  # the batch under way finished; no other started
    assert json.loads((out / "passkey.json").read_text())["lengths"] == [256]
    assert json.loads((out / runs.UNFINISHED).read_text())["stopped"] == "SIGTERM"

    calls.clear()
    resumed = passkey.run(**args, out_dir=str(out), resume=True)
    assert calls == [(1, 512)] * 4 + [(1, 1024)] * 4  # 512 again, then 1024
    assert resumed == reference == json.loads((out / "passkey.json").read_text())
    assert not (out / runs.UNFINISHED).exists() and (out / "passkey.png").exists()

    assert scored_again(lambda: passkey.run(**args, out_dir=str(out), resume=True), out, calls, {"seed": 1}) == [10, 10]


@pytest.mark.slow
def test_passkey_cli_stops_on_sigterm_with_its_status_and_the_same_command_resumes(toy_ckpt, tmp_path):
    """`megarope passkey`, SIGTERM once its first length is on disk: one line, exit 128 + SIGTERM; the same
    command then finishes, each length once, equal to a run that never stopped."""
    import signal

    from eval_helpers import sigterm_once_written
    from megarope.eval import passkey

    out = tmp_path / "pk"
    args = ["passkey", "--checkpoint", toy_ckpt, "--lengths", "512,1K,2K,4K", "--depths", "0,0.5,1", "--trials", "3",
            "--out", str(out)]
    returncode, stderr = sigterm_once_written(args, out / "passkey.json")
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    done = json.loads((out / "passkey.json").read_text())["lengths"]
    assert 1 <= len(done) < 4
    said = [line for line in stderr.splitlines() if line.startswith("megarope")]
    assert said == [f"megarope passkey: stopped by SIGTERM with {len(done)} of 4 lengths done (in {out}/passkey.json); "
                    f"run the same command to resume"]

    rerun = subprocess.run([sys.executable, "-m", "megarope", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {len(done)} of 4 lengths are in {out}/passkey.json" in rerun.stdout
    reference = passkey.run(toy_ckpt, [512, 1024, 2048, 4096], [0.0, 0.5, 1.0], 3, verbose=False)
    assert json.loads((out / "passkey.json").read_text()) == reference

"""What the evaluation tests share: a random toy checkpoint, real text of known sizes, a command stopped by
SIGTERM once it has written its first result, and what a rerun scores again."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

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
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in ("argparse.py", "inspect.py", "typing.py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            texts.append(f.read()[:20000])
    return texts + ["a short document"]


def count_scoring_calls(monkeypatch, signal_at: int | None = None, signum=signal.SIGINT) -> list:
    """Replace eval.scoring.score_sequences with itself, counting its calls (the batch shapes, returned list);
    with ``signal_at``, the call of that number also sends this process ``signum`` (before it scores)."""
    from megarope.eval import scoring

    score, calls = scoring.score_sequences, []

    def counted(model, ids, **kwargs):
        calls.append(ids.shape)
        if len(calls) == signal_at:
            os.kill(os.getpid(), signum)
        return score(model, ids, **kwargs)

    monkeypatch.setattr(scoring, "score_sequences", counted)
    return calls


def sigterm_once_written(args: list[str], path) -> tuple[int, str]:
    """Run `megarope ARGS`, send it SIGTERM as soon as ``path`` exists; its exit status and stderr."""
    proc = subprocess.Popen([*CLI, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill() if proc.poll() is None else None
    return proc.returncode, stderr


def scored_again(evaluate, out, calls: list, other_settings: dict) -> list[int]:
    """The scoring calls a rerun (``evaluate()``) makes when ``out`` holds a finished evaluation, then when it holds
    an unfinished one of ``other_settings``: neither is resumed."""
    from megarope.eval.runs import UNFINISHED

    counts = []
    for unfinished in (None, {"settings": other_settings, "stopped": "SIGTERM"}):
        if unfinished:
            (out / UNFINISHED).write_text(json.dumps(unfinished))
        calls.clear()
        evaluate()
        counts.append(len(calls))
    return counts

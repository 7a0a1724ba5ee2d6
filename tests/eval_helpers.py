"""What the evaluation tests share: a random toy checkpoint and real text of known sizes."""

import os
import signal
import sys
import sysconfig

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

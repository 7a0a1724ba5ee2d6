"""Passkey retrieval: can the model find a 5-digit number hidden in a long, boring context?

Each prompt is exactly L tokens (so it splits over CP ranks):

    [BOS] There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    I will quiz you about the important info there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...   (filler)
    The pass key is 12345. Remember it. 12345 is the pass key.        <- at depth d of the filler
    ... (the rest of the filler)
    What is the pass key? The pass key is 12345

Segments are tokenized separately and concatenated, and the filler is cut to the exact number of
tokens that makes the prompt L long; the key sentence goes in at the filler sentence boundary nearest
to depth d (0 = right after the introduction, 1 = right before the question).

Scoring is teacher-forced, in one forward pass: a trial passes when the model's argmax at every
answer token (the digits, and a leading space token when the tokenizer has one) is that token.
That is *exactly* greedy decoding's exact-match verdict for the answer: greedy decoding reproduces
the answer iff each next-token argmax, given the correct prefix, is the correct token, which is what
is checked -- at the cost of one forward pass instead of one per generated token (no KV cache
needed). ``digit_accuracy`` (fraction of answer tokens right) is a teacher-forced extra; greedy
decoding would not credit digits after the first mistake. The forward pass is eval.scoring's
score_sequences, the same core perplexity uses, with its CP split and bounded memory.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megarope import parallel, plots
from megarope.errors import UsageError
from megarope.eval import memory, runs, scoring
from megarope.eval.variants import variants_from_flags
from megarope.files import write_json_atomic
from megarope.trust import FOREIGN, Trust

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important info there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass(frozen=True)
class Prompt:
    tokens: torch.Tensor   # [length] token ids
    key: str
    key_start: int         # index of the key sentence's first token
    answer_start: int      # index of the answer's first token (the answer runs to the end)

    @property
    def answer_len(self) -> int:
        return self.tokens.shape[0] - self.answer_start


class PromptBuilder:
    """Tokenizes the fixed segments once; builds prompts of exact token lengths for one tokenizer."""

    def __init__(self, tokenizer, bos: bool = True):
        self.tokenizer = tokenizer
        # sentencepiece puts a space before every separately encoded segment; byte-level does not
        sep = "" if tokenizer.decode(tokenizer.encode("a") + tokenizer.encode("b")).strip() != "ab" else " "
        self.sep = sep
        self.head = ([tokenizer.bos] if bos and getattr(tokenizer, "bos", None) is not None else []) + \
            tokenizer.encode(INTRO)
        self.sentences = [tokenizer.encode(sep + s) for s in FILLER]
        self.question = tokenizer.encode(sep + QUESTION)

    def answer(self, key: str) -> list[int]:
        return self.tokenizer.encode(self.sep + key)  # " 12345" after "... The pass key is"

    def overhead(self, key: str = "00000") -> int:
        """Tokens that are not filler: everything but the filler for a prompt with this key."""
        return len(self.head) + len(self.tokenizer.encode(self.sep + KEY.format(key=key))) + \
            len(self.question) + len(self.answer(key))

    def build(self, length: int, depth: float, key: str) -> Prompt:
        if not 0.0 <= depth <= 1.0:
            raise UsageError(f"depth must be in [0, 1], got {depth}")
        key_ids = self.tokenizer.encode(self.sep + KEY.format(key=key))
        answer = self.answer(key)
        n_filler = length - len(self.head) - len(key_ids) - len(self.question) - len(answer)
        if n_filler < 0:
            raise UsageError(f"passkey length {length} is too short: the prompt needs {length - n_filler} tokens "
                             f"before any filler")
        # whole sentences, then cut from the front: only the first sentence can be partial, so depth 1 puts
        # the key right after a full stop, right before the question
        filler, bounds, k = [], [0], 0
        while len(filler) < n_filler:
            filler += self.sentences[k % len(self.sentences)]
            bounds.append(len(filler))
            k += 1
        cut = len(filler) - n_filler
        filler = filler[cut:]
        bounds = [0] + [b - cut for b in bounds if b > cut]
        before = min(bounds, key=lambda b: (abs(b - depth * n_filler), b))
        ids = self.head + filler[:before] + key_ids + filler[before:] + self.question + answer
        assert len(ids) == length, (len(ids), length)
        return Prompt(torch.tensor(ids, dtype=torch.long), key, len(self.head) + before, length - len(answer))


def make_keys(lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int) -> dict:
    """The random 5-digit keys, {(length, depth, trial): key}: the same for every checkpoint and variant."""
    rng = random.Random(seed)
    return {(n, d, t): str(rng.randint(10000, 99999)) for n in lengths for d in depths for t in range(trials)}


def score_prompts(model, prompts: Sequence[Prompt], **score_kwargs) -> list[tuple[bool, float]]:
    """(passed, fraction of answer tokens right) per prompt; all prompts have the same length."""
    loss, correct = scoring.score_sequences(model, torch.stack([p.tokens for p in prompts]), **score_kwargs)
    out = []
    for row, p in zip(correct, prompts):
        ok = row[p.answer_start - 1:]  # column i predicts token i+1
        out.append((bool(ok.all()), float(ok.float().mean())))
    return out


def run(checkpoint: str, lengths: Sequence[int], depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        trials: int = 5, out_dir: str | None = None, *, tokenizer: str | None = None, tp: int = 1, cp: int = 1,
        rope_base: float | None = None, dynamic_ntk: bool = False, log_scale_ref: int | None = None,
        seed: int = 0, bos: bool = True, backend: str | None = None, dtype: torch.dtype | None = None,
        batch_tokens: int = scoring.BATCH_TOKENS, max_memory: float | None = None, cp_comm: str = "auto",
        trust: Trust = FOREIGN, verbose: bool = True) -> dict:
    """Passkey accuracy of one checkpoint (in one RoPE variant) at each length x depth.

    Returns {"run", "checkpoint", "variant", "lengths", "depths", "trials", "accuracy" [depth][length],
    "digit_accuracy" [depth][length], "records": [...]}; with ``out_dir``, rank 0 writes passkey.json and
    passkey.png (the heatmap) there. ``max_memory``, ``cp_comm`` and ``trust`` as in eval.perplexity.run.
    """
    lengths = scoring.check_lengths(lengths, tp, cp)
    depths = list(dict.fromkeys(float(d) for d in depths))
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise UsageError(f"depths must be in [0, 1], got {depths}")
    if trials < 1:
        raise UsageError(f"trials must be positive, got {trials}")
    variant = variants_from_flags(None, rope_base, dynamic_ntk, log_scale_ref)[0]
    (r,) = runs.plan_runs([os.fspath(checkpoint)], [variant], tokenizer, trust)
    dtype = dtype or runs.default_dtype()
    if max_memory is not None:
        cp_comm = memory.check_max_memory({r.label: r.preset}, lengths, max_memory, torch.finfo(dtype).bits // 8,
                                          tp, cp, cp_comm, batch_tokens=batch_tokens)
    builder = PromptBuilder(r.tokenizer, bos)
    too_short = [n for n in lengths if n < builder.overhead()]
    if too_short:
        raise UsageError(f"passkey length {too_short[0]} is too short: the prompt needs at least "
                         f"{builder.overhead()} tokens with tokenizer {r.tokenizer.spec}")
    keys = make_keys(lengths, depths, trials, seed)

    own_init = parallel.ensure(tp, cp)
    main = parallel.is_main()  # decided now: after the teardown below every rank would look like rank 0

    def evaluate(_: runs.Run, model) -> list[dict]:
        records = []
        for n in lengths:
            prompts = [(d, t, builder.build(n, d, keys[n, d, t])) for d in depths for t in range(trials)]
            scores = score_prompts(model, [p for _, _, p in prompts], batch_tokens=batch_tokens)
            for d in depths:
                mine = [s for (dd, _, _), s in zip(prompts, scores) if dd == d]
                records.append({"length": n, "depth": d, "trials": trials,
                                "accuracy": sum(ok for ok, _ in mine) / trials,
                                "digit_accuracy": sum(frac for _, frac in mine) / trials})
            if verbose and main:
                row = "  ".join(f"{rec['depth']:g}: {rec['accuracy']:.2f}" for rec in records if rec["length"] == n)
                print(f"{r.name} @ {n}: accuracy by depth  {row}", flush=True)
        return records

    try:
        ((_, records),) = runs.each_run([r], evaluate, backend, dtype, cp_comm)
    finally:
        if own_init:
            parallel.destroy()
    cell = {(rec["depth"], rec["length"]): rec for rec in records}
    result = {"run": r.name, "checkpoint": r.checkpoint, "variant": variant.name, "tokenizer": r.tokenizer.spec,
              "lengths": lengths, "depths": depths, "trials": trials, "seed": seed,
              "scoring": "teacher-forced argmax of every answer token (= greedy decoding's exact match)",
              "accuracy": [[cell[d, n]["accuracy"] for n in lengths] for d in depths],
              "digit_accuracy": [[cell[d, n]["digit_accuracy"] for n in lengths] for d in depths],
              "records": records}
    if out_dir and main:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(os.path.join(out_dir, "passkey.json"), result)
        plots.passkey_heatmap(lengths, depths, result["accuracy"], os.path.join(out_dir, "passkey.png"),
                              title=f"Passkey retrieval: {r.name}")
        if verbose:
            print(f"results in {out_dir}/passkey.json and passkey.png")
    return result

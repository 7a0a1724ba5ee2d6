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

import functools
import json
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
from megarope.signals import Stopped
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
        resume: bool = False, trust: Trust = FOREIGN, verbose: bool = True) -> dict:
    """Passkey accuracy of one checkpoint (in one RoPE variant) at each length x depth.

    Returns {"run", "checkpoint", "variant", "lengths", "depths", "trials", "accuracy" [depth][length],
    "digit_accuracy" [depth][length], "records": [...]}; with ``out_dir``, rank 0 writes passkey.json there as
    each length completes (the lengths done so far), then passkey.png (the heatmap). ``max_memory``,
    ``cp_comm`` and ``trust`` as in eval.perplexity.run.

    It stops and resumes as `megarope eval` does (runs.StopAndResume): SIGTERM, SIGINT and SIGUSR1 (in the main
    thread) stop every rank before its next batch of prompts, and signals.Stopped is raised on every rank; a
    length whose pass is interrupted records nothing. With ``resume`` (what `megarope passkey` passes), an
    unfinished run in out_dir with the same checkpoint, variant, tokenizer, keys and numerics goes on at its
    next unscored length.
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
    settings = {"checkpoint": r.checkpoint, "variant": variant.name, "tokenizer": r.tokenizer.digest,
                "lengths": lengths, "depths": depths, "trials": trials, "seed": seed, "bos": bos,
                "backend": backend, "dtype": str(dtype)}
    job = runs.StopAndResume(out_dir, settings if out_dir else None)
    kept = _read_records(out_dir) if resume and job.resumable else []
    summary = functools.partial(_summary, r, variant.name, depths, trials, seed)
    with job:
        records = _run(r, builder, keys, lengths, depths, trials, kept, job, summary, out_dir, tp=tp, cp=cp,
                       backend=backend, dtype=dtype, batch_tokens=batch_tokens, cp_comm=cp_comm, verbose=verbose)
    result = summary(records)
    if out_dir and job.main:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(os.path.join(out_dir, "passkey.json"), result)
        plots.passkey_heatmap(lengths, depths, result["accuracy"], os.path.join(out_dir, "passkey.png"),
                              title=f"Passkey retrieval: {r.name}")
        if verbose:
            print(f"results in {out_dir}/passkey.json and passkey.png")
    job.finish()
    return result


def _run(r: runs.Run, builder: PromptBuilder, keys: dict, lengths, depths, trials, kept: list[dict],
         job: runs.StopAndResume, summary, out_dir, *, tp, cp, backend, dtype, batch_tokens, cp_comm,
         verbose) -> list[dict]:
    """The records of every length, ``kept`` ones first: each length's prompts in batches, a stop checked
    before each (and before the model is loaded); passkey.json rewritten as each length completes."""
    todo = [n for n in lengths if n not in {rec["length"] for rec in kept}]
    records = list(kept)

    def evaluate(_: runs.Run, model) -> None:
        for n in todo:
            prompts = [(d, t, builder.build(n, d, keys[n, d, t])) for d in depths for t in range(trials)]
            per_batch = max(1, batch_tokens // n)
            scores = []
            for start in range(0, len(prompts), per_batch):
                job.check()  # collective: every rank stops before the same batch
                scores += score_prompts(model, [p for _, _, p in prompts[start:start + per_batch]],
                                        batch_tokens=batch_tokens)
            for d in depths:
                mine = [s for (dd, _, _), s in zip(prompts, scores) if dd == d]
                records.append({"length": n, "depth": d, "trials": trials,
                                "accuracy": sum(ok for ok, _ in mine) / trials,
                                "digit_accuracy": sum(frac for _, frac in mine) / trials})
            if out_dir and job.main:
                job.mark_unfinished()
                write_json_atomic(os.path.join(out_dir, "passkey.json"), summary(records))
            if verbose and job.main:
                row = "  ".join(f"{rec['depth']:g}: {rec['accuracy']:.2f}" for rec in records if rec["length"] == n)
                print(f"{r.name} @ {n}: accuracy by depth  {row}", flush=True)

    if verbose and job.main and kept:
        print(f"resuming: {len(lengths) - len(todo)} of {len(lengths)} lengths are in {out_dir}/passkey.json",
              flush=True)
    own_init = parallel.ensure(tp, cp)
    try:
        if todo:
            job.check()
            for _ in runs.each_run([r], evaluate, backend, dtype, cp_comm):
                pass
    except Stopped as e:
        done = len({rec["length"] for rec in records})
        raise job.stopped(e, f"{done} of {len(lengths)} lengths", "passkey.json") from None
    finally:
        if own_init:
            parallel.destroy()
    return sorted(records, key=lambda rec: (lengths.index(rec["length"]), depths.index(rec["depth"])))


def _summary(r: runs.Run, variant: str, depths, trials, seed, records: list[dict]) -> dict:
    """passkey.json: the run, and accuracy [depth][length] over the lengths ``records`` hold."""
    lengths = list(dict.fromkeys(rec["length"] for rec in records))
    cell = {(rec["depth"], rec["length"]): rec for rec in records}
    return {"run": r.name, "checkpoint": r.checkpoint, "variant": variant, "tokenizer": r.tokenizer.spec,
            "lengths": lengths, "depths": depths, "trials": trials, "seed": seed,
            "scoring": "teacher-forced argmax of every answer token (= greedy decoding's exact match)",
            "accuracy": [[cell[d, n]["accuracy"] for n in lengths] for d in depths],
            "digit_accuracy": [[cell[d, n]["digit_accuracy"] for n in lengths] for d in depths],
            "records": records}


def _read_records(out_dir: str) -> list[dict]:
    """The records of the lengths an earlier, unfinished run wrote to out_dir/passkey.json."""
    try:
        with open(os.path.join(out_dir, "passkey.json")) as f:
            return json.load(f)["records"]
    except (OSError, ValueError, KeyError):
        return []

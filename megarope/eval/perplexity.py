"""Perplexity against length: `megarope eval`.

For each run (checkpoint x variant) and length L, every document at least L tokens long is read to
L tokens and its L-1 next-token predictions scored (eval.scoring); shorter documents are skipped for
that length and counted in ``n_skipped``; ``max_docs`` scores at most the first N long-enough
documents per length. Per position, the loss is averaged over documents, and the record holds the
loss, perplexity, accuracy, log-spaced position buckets and the measured break past the run's tuning
length (eval.metrics). Documents are shared out over the data-parallel ranks.

Several lengths cost one read of each document: attention is causal, so a document truncated at L
scores exactly the first L-1 targets of the same document read to a longer length -- unless RoPE
depends on the length (dynamic NTK), which is why that variant, and the sliding window, go length
by length.

Outputs (rank 0, in ``out_dir``): results.json and results.csv, rewritten as each (run, length)
completes, then ppl_vs_length.png and loss_by_position.png.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from megarope import lineage, parallel, plots
from megarope.signals import Stopped
from megarope.errors import UsageError
from megarope.eval import documents, memory, metrics, runs, scoring
from megarope.eval.variants import Variant, variants_from_flags
from megarope.files import atomic_files, write_json_atomic
from megarope.loss import DEFAULT_CHUNK
from megarope.rope import dynamic_ntk_base
from megarope.trust import FOREIGN, Trust
from megarope.units import format_tokens

CSV_FIELDS = ["run", "checkpoint", "variant", "base", "effective_base", "length", "loss", "ppl", "accuracy", "n_docs",
              "n_skipped", "n_tokens", "window", "stride", "predicted_bound", "regime", "measured_break", "tokens_per_s",
              "buckets"]
RESUME_KEYS = ("checkpoint", "variant", "window", "stride", "tokenizer")  # what a reusable record must share


# ----------------------------------------------------------------------------------------------- one model
def _progress(total: int, label: str, show: bool):
    return tqdm(total=total, desc=label, unit=" docs", disable=None if show and parallel.is_main() else True,
                leave=False)


def _reduce_over_dp(sums: torch.Tensor, group, size: int) -> torch.Tensor:
    if size > 1:
        # A rank without a last batch gets here while another scores its own (minutes at 1M tokens): the wait
        # is on the host-side group, not inside the NCCL all-reduce, whose watchdog would end it after the
        # data-parallel group's timeout (megatron's subgroups: 30 minutes; parallel.py).
        parallel.wait_for_all()
        sums = sums.to(parallel.device())
        dist.all_reduce(sums, group=group)
    return sums.cpu()


def _stop_checked(batches_of: Callable[[int], list], dp_rank: int, dp_size: int,
                  check_stop: Callable[[], None] | None) -> Iterator:
    """This data-parallel rank's batches, ``batches_of(dp_rank)``, with ``check_stop()`` before each.

    check_stop is a collective (every rank must agree to stop), so each rank calls it as often as the
    rank with the most batches has batches; a rank with fewer calls it the remaining times after its
    own last batch.
    """
    mine = batches_of(dp_rank)
    steps = max(len(batches_of(rank)) for rank in range(dp_size)) if check_stop else len(mine)
    for k in range(steps):
        if check_stop:
            check_stop()
        if k < len(mine):
            yield mine[k]


def evaluate_model(model, docs: Sequence[torch.Tensor], lengths: Sequence[int], window: int | None = None,
                   stride: int | None = None, max_docs: int | None = None, bucket0: int = metrics.DEFAULT_BUCKET0,
                   progress: str | None = None, positions: bool = False, break_after: int | None = None,
                   on_record: Callable[[dict], None] | None = None, check_stop: Callable[[], None] | None = None,
                   **score_kwargs) -> list[dict]:
    """Score ``docs`` (token id tensors) at each length; documents are split over data-parallel ranks.

    Returns one dict per length (length, loss, ppl, accuracy, n_docs, n_skipped, n_tokens, buckets,
    seconds, tokens_per_s, and with ``break_after`` the measured_break of its loss curve past that
    length: metrics.summarize), each also passed to ``on_record`` as soon as it is complete.
    ``check_stop`` is called before each batch, as often on every rank (see _stop_checked), and stops
    the evaluation by raising: a length whose pass it interrupts gives no record.
    """
    if window is None and not model.megarope_rope.dynamic_ntk and len(lengths) > 1:
        return _evaluate_by_prefix(model, docs, lengths, max_docs, bucket0, progress, positions, break_after,
                                   on_record, check_stop, **score_kwargs)
    dp_rank, dp_size, dp_group = runs.data_parallel()
    results = []
    for length in lengths:
        eligible = [i for i, d in enumerate(docs) if d.shape[0] >= length]
        chosen = eligible[:max_docs] if max_docs else eligible
        sums = torch.zeros(2, length - 1, dtype=torch.float64)  # loss, correct
        started = time.perf_counter()
        bar = _progress(len(chosen), f"{progress or 'eval'} @ {length}", progress is not None)
        if window is None or window >= length:
            per_batch = max(1, score_kwargs.get("batch_tokens", scoring.BATCH_TOKENS) // length)

            def batches_of(rank, chosen=chosen, per_batch=per_batch):
                mine = chosen[rank::dp_size]
                return [mine[k:k + per_batch] for k in range(0, len(mine), per_batch)]

            for rows in _stop_checked(batches_of, dp_rank, dp_size, check_stop):
                ids = torch.stack([docs[i][:length] for i in rows])
                lo, ok = scoring.score_sequences(model, ids, **score_kwargs)
                sums += torch.stack([lo.double().sum(0), ok.double().sum(0)])
                bar.update(ids.shape[0] * dp_size)
        else:
            for (i,) in _stop_checked(lambda rank, chosen=chosen: [[i] for i in chosen[rank::dp_size]], dp_rank,
                                      dp_size, check_stop):
                lo, ok = scoring.score_windowed(model, docs[i][:length], window, stride, **score_kwargs)
                sums += torch.stack([lo.double(), ok.double()])
                bar.update(dp_size)
        bar.close()
        loss_sum, correct_sum = _reduce_over_dp(sums, dp_group, dp_size)
        seconds = time.perf_counter() - started
        record = {"length": length,
                  **metrics.summarize(loss_sum, correct_sum, len(chosen), bucket0, positions, break_after),
                  "n_docs": len(chosen), "n_skipped": len(docs) - len(eligible), "seconds": seconds,
                  "tokens_per_s": len(chosen) * length / seconds if seconds > 0 else float("nan")}
        results.append(record)
        if on_record:
            on_record(record)
    return results


def _evaluate_by_prefix(model, docs, lengths, max_docs, bucket0, progress, positions, break_after, on_record,
                        check_stop, **score_kwargs) -> list[dict]:
    """evaluate_model for several full-sequence lengths in one pass per document.

    Each document is read once, at the longest length it is chosen for, and every shorter length
    takes that pass's prefix. ``seconds`` is then the time of the whole pass, shared by every length.
    """
    dp_rank, dp_size, dp_group = runs.data_parallel()
    eligible = {L: [i for i, d in enumerate(docs) if d.shape[0] >= L] for L in lengths}
    chosen = {L: set(eligible[L][:max_docs] if max_docs else eligible[L]) for L in lengths}
    longest = {}
    for L in lengths:
        for i in chosen[L]:
            longest[i] = max(longest.get(i, 0), L)

    def batches_of(rank: int) -> list[tuple[int, list[int]]]:  # (read length, documents), shortest first
        mine = sorted(longest)[rank::dp_size]
        batches = []
        for read_len in sorted({longest[i] for i in mine}):
            group = [i for i in mine if longest[i] == read_len]
            per_batch = max(1, score_kwargs.get("batch_tokens", scoring.BATCH_TOKENS) // read_len)
            batches += [(read_len, group[k:k + per_batch]) for k in range(0, len(group), per_batch)]
        return batches

    sums = {L: torch.zeros(2, L - 1, dtype=torch.float64) for L in lengths}
    started = time.perf_counter()
    bar = _progress(len(longest), f"{progress or 'eval'} @ {max(lengths)}", progress is not None)
    for read_len, rows in _stop_checked(batches_of, dp_rank, dp_size, check_stop):
        lo, ok = scoring.score_sequences(model, torch.stack([docs[i][:read_len] for i in rows]), **score_kwargs)
        for row, i in enumerate(rows):
            for L in lengths:
                if i in chosen[L]:
                    sums[L][0] += lo[row, :L - 1].double()
                    sums[L][1] += ok[row, :L - 1].double()
        bar.update(len(rows) * dp_size)
    bar.close()
    seconds = time.perf_counter() - started
    read_tokens = sum(longest.values())
    results = []
    for L in lengths:
        loss_sum, correct_sum = _reduce_over_dp(sums[L], dp_group, dp_size)
        record = {"length": L,
                  **metrics.summarize(loss_sum, correct_sum, len(chosen[L]), bucket0, positions, break_after),
                  "n_docs": len(chosen[L]), "n_skipped": len(docs) - len(eligible[L]), "seconds": seconds,
                  "tokens_per_s": read_tokens / seconds if seconds > 0 else float("nan")}
        results.append(record)
        if on_record:
            on_record(record)
    return results


# ----------------------------------------------------------------------------------------------- records
def run_record(run: runs.Run, model, result: dict, window: int | None, stride: int | None) -> dict:
    """A result of evaluate_model with what identifies it: the run, its RoPE, the scaling law's bound."""
    rope = model.megarope_rope
    bound, regime = lineage.predicted_bound(run.meta, rope.base)
    pretraining = lineage.lineage_of(run.meta)
    scored_len = window if window is not None and window < result["length"] else result["length"]
    effective = rope.base
    if rope.dynamic_ntk:
        effective = dynamic_ntk_base(rope.base, scored_len, rope.train_len, model.rotary_pos_emb.rotary_dim,
                                     rope.ntk_alpha)
    return {"run": run.name, "checkpoint": run.checkpoint, "variant": run.variant.name, "base": rope.base,
            "effective_base": effective, "dynamic_ntk": rope.dynamic_ntk, "log_scale_ref": rope.log_scale_ref,
            "tune_len": rope.train_len, "pretrain_len": pretraining.pretrain_len,
            "pretrain_base": pretraining.pretrain_base, "predicted_bound": bound,
            "regime": regime, "window": window, "stride": (stride or window // 2) if window else None,
            "tokenizer": run.tokenizer.spec, **result}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_results(records: list[dict], out_dir: str, figures: bool = True) -> None:
    """results.json and results.csv (each atomically), and with ``figures`` the two plots."""
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "results.json"), _json_safe(records))
    with atomic_files([os.path.join(out_dir, "results.csv")]) as (tmp,), open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            row = dict(rec)
            row["buckets"] = ";".join(f"{b['start']}-{b['end']}:{b['loss']:.5f}" for b in rec["buckets"])
            writer.writerow(row)
    if figures:
        plots.ppl_vs_length(records, os.path.join(out_dir, "ppl_vs_length.png"))
        plots.loss_by_position(records, os.path.join(out_dir, "loss_by_position.png"))


def _from_json(x, key=None):
    """The inverse of _json_safe: "inf" back to a float, and a NaN metric back from null."""
    if isinstance(x, dict):
        return {k: _from_json(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    if x in ("inf", "-inf"):
        return float(x)
    return float("nan") if x is None and key in ("loss", "ppl", "accuracy", "tokens_per_s") else x


def read_results(out_dir: str) -> list[dict]:
    """The records an earlier evaluation wrote to ``out_dir`` (none when there is no results.json)."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return _from_json(json.load(f))


def _fmt_ppl(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}" if x < 1e5 else f"{x:.3g}"


def format_table(records: list[dict]) -> str:
    """Rows = runs, columns = lengths, cells = perplexity."""
    names = list(dict.fromkeys(r["run"] for r in records))
    lengths = sorted({r["length"] for r in records})
    cell = {(r["run"], r["length"]): r["ppl"] for r in records}
    width = max([len("run")] + [len(r) for r in names])
    head = f"{'run':<{width}}" + "".join(f"  {format_tokens(n):>9}" for n in lengths)
    lines = ["perplexity", head, "-" * len(head)]
    for name in names:
        lines.append(f"{name:<{width}}" + "".join(f"  {_fmt_ppl(cell.get((name, n))):>9}" for n in lengths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the command
def _check_options(lengths, tp, cp, window, stride, max_docs, bucket0) -> list[int]:
    lengths = scoring.check_lengths(lengths, tp, cp)
    if window is not None:
        scoring.check_lengths([window], tp, cp, "window")
        if stride is not None and not 0 < stride < window:
            raise UsageError(f"stride must be in 1..window-1 ({window - 1}), got {stride}")
    elif stride is not None:
        raise UsageError("stride needs a window")
    if max_docs is not None and max_docs < 1:
        raise UsageError(f"max_docs must be positive, got {max_docs}")
    if bucket0 < 1:
        raise UsageError(f"bucket0 must be positive, got {bucket0}")
    return lengths


def _tokenized_documents(planned: list[runs.Run], docs_or_paths, lengths: list[int], bos: bool) -> dict:
    """One tokenization of the documents per distinct tokenizer; a length above every document is refused."""
    texts = documents.load_texts(docs_or_paths)
    tokenized = {}
    for r in planned:
        key = r.tokenizer.spec
        if key not in tokenized:
            tokenized[key] = documents.tokenize(texts, r.tokenizer, max(lengths), bos)
            longest = max(d.shape[0] for d in tokenized[key])
            too_long = [length for length in lengths if length > longest]
            if too_long:
                raise UsageError(f"length {too_long[0]} is longer than every document (the longest has {longest} "
                                 f"tokens with tokenizer {key})")
    return tokenized


def _resumable(out_dir: str, planned: list[runs.Run], lengths: list[int], window, stride) -> list[dict]:
    """The records in ``out_dir`` that this evaluation would produce again: same run, length and settings."""
    wanted = {r.name: r for r in planned}
    stride = (stride or window // 2) if window else None
    keep = []
    for rec in read_results(out_dir):
        r = wanted.get(rec.get("run"))
        if r is None or rec.get("length") not in lengths:
            continue
        mine = {"checkpoint": r.checkpoint, "variant": r.variant.name, "window": window, "stride": stride,
                "tokenizer": r.tokenizer.spec}
        if all(rec.get(k) == mine[k] for k in RESUME_KEYS):
            keep.append(rec)
    return keep


def _settings(tokenized: dict, max_docs, bucket0, positions, backend, dtype) -> dict:
    """What decides a record's values beyond what the record itself says (RESUME_KEYS): the documents
    as tokens, which of them count, the buckets, the numerics."""
    digest = hashlib.sha256()
    for spec in sorted(tokenized):
        digest.update(spec.encode())
        for doc in tokenized[spec]:
            digest.update(doc.numpy().tobytes())
    return {"documents": digest.hexdigest(), "max_docs": max_docs, "bucket0": bucket0, "positions": positions,
            "backend": backend, "dtype": str(dtype)}


def run(checkpoints: Sequence[str] | str, docs_or_paths: Sequence, lengths: Sequence[int],
        variants: Sequence[str | Variant] | None = None, out_dir: str | None = None, *, tokenizer: str | None = None,
        tp: int = 1, cp: int = 1, rope_base: float | None = None, dynamic_ntk: bool = False,
        log_scale_ref: int | None = None, window: int | None = None, stride: int | None = None,
        max_docs: int | None = None, bos: bool = True, bucket0: int = metrics.DEFAULT_BUCKET0,
        backend: str | None = None, dtype: torch.dtype | None = None, chunk: int = DEFAULT_CHUNK,
        mlp_chunk: int | None = scoring.MLP_CHUNK, batch_tokens: int = scoring.BATCH_TOKENS, positions: bool = False,
        max_memory: float | None = None, cp_comm: str = "auto", resume: bool | None = False,
        trust: Trust = FOREIGN, verbose: bool = True) -> list[dict]:
    """Evaluate every (checkpoint, variant) at every length; returns the records (on every rank).

    Works in a plain process (it initializes TP x CP itself, world of one, and tears it down after) and
    under torchrun (the world is TP x CP x DP; documents are split over DP). With ``out_dir``, rank 0
    writes results.json and results.csv there as each (run, length) completes, then ppl_vs_length.png
    and loss_by_position.png. ``variants`` defaults to the one that --rope-base/--dynamic-ntk/--log-scale
    describe (see eval.variants.variants_from_flags). ``positions`` adds each record's per-position mean
    loss curve ("position_loss", L-1 floats; see metrics.measured_break) -- to results.json too, so leave
    it off for very long lengths.

    ``max_memory`` (GB per rank) refuses, before any model or document is loaded, what
    eval.memory.estimate_eval_memory says will not fit. ``cp_comm`` is how the context-parallel
    attention passes K/V (see megarope.attention). With ``resume``, (run, length) pairs that
    ``out_dir``'s results.json already holds with the same settings are kept and not evaluated again
    (the documents, max_docs and bucket0 must be those of the earlier evaluation). ``resume=None`` (what
    `megarope eval` passes) resumes only an evaluation that did not finish, with the same documents and
    settings: out_dir holds its unfinished.json until the end.

    SIGTERM, SIGINT and SIGUSR1 (in the main thread) stop every rank before its next batch, all ranks
    agreeing; a (run, length) whose pass is interrupted records nothing. The results so far are on disk,
    unfinished.json says which signal stopped it, and signals.Stopped is raised (on every rank).

    ``trust`` (megarope.trust): FOREIGN loads nothing that can run code and refuses, in one line, a
    checkpoint that needs it; a command evaluating its own outputs (the demo) passes OWN; USER is the
    user's --trust-checkpoint.
    """
    checkpoints = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    checkpoints = [os.fspath(c) for c in checkpoints]
    lengths = _check_options(lengths, tp, cp, window, stride, max_docs, bucket0)
    planned = runs.plan_runs(checkpoints, variants_from_flags(variants, rope_base, dynamic_ntk, log_scale_ref),
                             tokenizer, trust)
    dtype = dtype or runs.default_dtype()
    if max_memory is not None:
        cp_comm = memory.check_max_memory({r.label: r.preset for r in planned}, lengths, max_memory,
                                          torch.finfo(dtype).bits // 8, tp, cp, cp_comm, window, batch_tokens)
    tokenized = _tokenized_documents(planned, docs_or_paths, lengths, bos)
    job = runs.StopAndResume(out_dir, _settings(tokenized, max_docs, bucket0, positions, backend, dtype)
                             if out_dir else None)
    with job:
        return _run(planned, tokenized, lengths, out_dir, job.resumable if resume is None else resume, job, tp=tp,
                    cp=cp, window=window, stride=stride, max_docs=max_docs, bucket0=bucket0, backend=backend,
                    dtype=dtype, score_kwargs={"chunk": chunk, "mlp_chunk": mlp_chunk, "batch_tokens": batch_tokens},
                    positions=positions, cp_comm=cp_comm, verbose=verbose)


def _run(planned, tokenized, lengths, out_dir, resume, job, *, tp, cp, window, stride, max_docs, bucket0, backend,
         dtype, score_kwargs, positions, cp_comm, verbose) -> list[dict]:
    own_init = parallel.ensure(tp, cp)
    main = job.main
    order = {(r.name, L): k for k, (r, L) in enumerate((r, L) for r in planned for L in lengths)}

    def in_order(records: list[dict]) -> list[dict]:
        return sorted(records, key=lambda rec: order[rec["run"], rec["length"]])

    resumed = _resumable(out_dir, planned, lengths, window, stride) if resume and out_dir else ()
    total = len(planned) * len(lengths)

    def write(records: list[dict]) -> None:
        # out_dir is touched only once there is something to keep: a checkpoint refused at load leaves none
        job.mark_unfinished()
        write_results(in_order(records), out_dir, figures=False)

    log = runs.ResultLog(write if out_dir and main else None, resumed)
    if out_dir:
        parallel.wait_for_all()  # every rank has read what an earlier evaluation left before it is replaced
        if main and resumed and verbose:
            print(f"resuming: {len(resumed)} of {total} (run, length) results are in {out_dir}/results.json",
                  flush=True)

    def unscored():  # the runs with lengths left, each checked for a stop before its model is loaded
        for r in planned:
            if log.pending(r.name, lengths):
                job.check()
                yield r

    def evaluate(r: runs.Run, model) -> None:
        def on_record(result: dict) -> None:
            rec = run_record(r, model, result, window, stride)
            log.add(rec)
            if verbose and main:
                print(f"{r.name} @ {rec['length']}: ppl {rec['ppl']:.4g}  loss {rec['loss']:.4f}  acc "
                      f"{rec['accuracy']:.4f}  ({rec['n_docs']} docs, {rec['n_skipped']} skipped, "
                      f"{rec['seconds']:.1f} s)", flush=True)

        evaluate_model(model, tokenized[r.tokenizer.spec], log.pending(r.name, lengths), window, stride, max_docs,
                       bucket0, progress=r.name if verbose else None, positions=positions,
                       break_after=model.megarope_rope.train_len, on_record=on_record,
                       check_stop=job.check, **score_kwargs)

    try:
        for _ in runs.each_run(unscored(), evaluate, backend, dtype, cp_comm):
            pass  # each record was logged, and written, as it completed
    except Stopped as e:
        raise job.stopped(e, f"{len(log.records)} of {total} (run, length) results", "results.json") from None
    finally:
        if own_init:
            parallel.destroy()
    records = in_order(log.records)
    if out_dir and main:
        write_results(records, out_dir)
    job.finish()
    if verbose and main:
        print()
        print(format_table(records))
        if out_dir:
            print(f"\nresults in {out_dir}/results.json, results.csv, ppl_vs_length.png, loss_by_position.png")
    return records

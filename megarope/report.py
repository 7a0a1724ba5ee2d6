"""What an experiment reports (megarope.experiment), from the records of its evaluations (eval.perplexity's):
the summary (base, predicted bound, measured break), the tables it prints, and report.md. Pure Python.

Rows are (base, variant) in the order of the bases; a record's base is the one its checkpoint was tuned with
(``tuned``: base -> checkpoint), whatever base a variant reads it at.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from megarope.units import format_tokens

if TYPE_CHECKING:
    from megarope.experiment import Model
    from megarope.experiment_config import ExperimentConfig


def _rows(records: list[dict], tuned: dict[float, str]) -> list[tuple[float, str, dict[int, dict]]]:
    """(base, variant, {length: record}) in the order of the bases, then of the variants."""
    base_of = {os.path.realpath(ckpt): base for base, ckpt in tuned.items()}
    rows = {}
    for r in records:
        rows.setdefault((base_of[os.path.realpath(r["checkpoint"])], r["variant"]), {})[r["length"]] = r
    order = {b: i for i, b in enumerate(tuned)}
    return [(b, v, by_len) for (b, v), by_len in sorted(rows.items(), key=lambda kv: order[kv[0][0]])]


def summarize(records: list[dict], tuned: dict[float, str]) -> list[dict]:
    """Per base: the predicted bound (Theorem 3, from the lineage) and the measured break
    (eval.metrics.measured_break) at the longest length, of as-trained, and of each variant when there are more."""
    longest = max(r["length"] for r in records)
    rows = _rows([r for r in records if r["length"] == longest], tuned)
    names = list(dict.fromkeys(v for _, v, _ in rows))
    summary = []
    for base in dict.fromkeys(b for b, _, _ in rows):
        mine = {v: by_len[longest] for b, v, by_len in rows if b == base}
        trained = mine.get("as-trained") or next(iter(mine.values()))  # the bound is as-trained's (eq. 16b)
        row = {"base": base, "predicted_bound": trained.get("predicted_bound"),
               "measured_break": mine["as-trained"].get("measured_break") if "as-trained" in mine else None}
        if names != ["as-trained"]:
            row["measured_breaks"] = {v: rec.get("measured_break") for v, rec in mine.items()}
        summary.append(row)
    return summary


def _ppl(x) -> str:
    return "-" if x is None or math.isnan(x) else (f"{x:.4g}" if x < 1e5 else f"{x:.3g}")


def format_report(records: list[dict], tuned: dict[float, str], summary: list[dict], timings: dict,
                  unit: str = "token") -> str:
    """What the run prints: perplexity by length (with several variants), loss by position at the longest
    length, the predicted bound beside the measured break, and the time each stage took."""
    rows = _rows(records, tuned)
    several = len({v for _, v, _ in rows}) > 1
    label = (lambda b, v: f"base {b:g} {v}") if several else (lambda b, v: f"base {b:g}")
    width = max([12] + [len(label(b, v)) + 1 for b, v, _ in rows])
    lines = []
    if several:
        lengths = sorted({n for _, _, by_len in rows for n in by_len})
        lines += ["perplexity by evaluation length", f"{'model':<{width}}" + "".join(f"{format_tokens(n):>9}"
                                                                                     for n in lengths)]
        lines += [f"{label(b, v):<{width}}" + "".join(f"{_ppl(by_len[n]['ppl']) if n in by_len else '-':>9}"
                                                      for n in lengths) for b, v, by_len in rows]
        lines.append("")
    longest = {(b, v): by_len[max(by_len)] for b, v, by_len in rows}
    buckets = next(iter(longest.values()))["buckets"]
    lines += [f"mean loss (nats/{unit}) by position",
              f"{'model':<{width}}" + "".join(f"{b['start']}-{b['end']:>}".rjust(11) for b in buckets)]
    for (b, v), rec in longest.items():
        lines.append(f"{label(b, v):<{width}}" + "".join(f"{x['loss']:>11.3f}" for x in rec["buckets"]))
    others = [v for v in (summary[0].get("measured_breaks") or {}) if v != "as-trained"]
    lines += ["", f"{'base':>8}  {'predicted bound':>16}  {'measured break':>15}"
              + "".join(f"  {'break, ' + v:>{max(15, len(v) + 7)}}" for v in others)]
    for s in summary:
        lines.append(f"{s['base']:>8g}  {format_tokens(s['predicted_bound']):>16}  {format_tokens(s['measured_break']):>15}"
                     + "".join(f"  {format_tokens(s['measured_breaks'][v]):>{max(15, len(v) + 7)}}" for v in others))
    lines += ["", "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())]
    return "\n".join(lines)


def _md_table(head: list[str], body: list[list[str]], words: int = 1) -> list[str]:
    """A markdown table; the first ``words`` columns left-aligned, the numbers right-aligned."""
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < words else "---:" for i in range(len(head))) + "|",
            *("| " + " | ".join(row) + " |" for row in body)]


def _ppl_table(records: list[dict], tuned: dict[float, str]) -> list[str]:
    rows = _rows(records, tuned)
    lengths = sorted({n for _, _, by_len in rows for n in by_len})
    return _md_table(["base", "variant"] + [format_tokens(n) for n in lengths],
                     [[f"{b:g}", v] + [_ppl(by_len[n]["ppl"]) if n in by_len else "-" for n in lengths]
                      for b, v, by_len in rows], words=2)


def markdown(cfg: ExperimentConfig, model: Model, results: dict[str, list[dict]], tuned: dict[float, str],
             summary: list[dict], timings: dict, machine: str) -> str:
    """report.md: what was run, the tables, the figures, how long it took and on what ``machine``, in words a
    paper can take."""
    lin, t = model.lineage, cfg.tune
    tokens = t.steps * t.global_batch * t.seq_len
    main = cfg.eval
    lines = [f"# RoPE bases and extrapolation: {model.name}", "",
             f"**Setup.** {model.describe()}. Lineage (what the scaling law predicts from): pretrained at "
             f"{lin.pretrain_len:,} tokens with RoPE base {lin.pretrain_base:,.6g}, last trained at {lin.tune_len:,} tokens "
             f"({'; '.join(sorted(set(lin.sources.values())))}). Continued at {t.seq_len:,} tokens for {t.steps} steps "
             f"of {t.global_batch} sequences ({format_tokens(tokens)} tokens per base; AdamW, lr {t.lr:g} with "
             f"{t.warmup_steps} warmup steps, {t.lr_decay_style} to {t.min_lr:g}) with each of the bases "
             f"{', '.join(f'{b:g}' for b in t.bases)}. Evaluated on {main.docs} held-out documents "
             f"({'the corpus given' if cfg.data.eval else 'the Python standard library: ' + cfg.data.corpus}) at "
             f"{', '.join(format_tokens(n) for n in main.lengths)} tokens, variants {', '.join(main.variants)}.", "",
             "## Perplexity", "", *_ppl_table(results["eval"], tuned), "",
             "## Predicted bound and measured break", ""]
    others = [v for v in (summary[0].get("measured_breaks") or {}) if v != "as-trained"]
    regimes = {}
    for base, variant, by_len in _rows(results["eval"], tuned):
        if base not in regimes or variant == "as-trained":
            regimes[base] = by_len[max(by_len)].get("regime")
    lines += _md_table(["base", "regime", "predicted bound (eq. 16b)", "measured break"]
                       + [f"measured break, {v}" for v in others],
                       [[f"{s['base']:g}", str(regimes.get(s["base"]) or "-"), format_tokens(s["predicted_bound"]),
                         format_tokens(s["measured_break"])] + [format_tokens(s["measured_breaks"][v]) for v in others]
                        for s in summary], words=2)
    lines += ["", "The predicted bound is Theorem 3 of Liu et al. (2023) from the lineage above and the tuning "
                  "length; \"none\" below beta_3, where no hard bound is predicted. The measured break is the first "
                  "position past the tuning length where the loss, averaged over a quarter octave, is 1 nat above the "
                  "in-length level and 1 nat above its value an octave earlier (a cliff, not a slow rise).", "",
              "![perplexity against evaluation length](ppl_vs_length.png)", "",
              "![loss by position at the longest length](loss_by_position.png)", ""]
    for label, group in cfg.groups()[1:]:
        if label in results:
            lines += [f"## {label}", "", *_ppl_table(results[label], tuned), "",
                      f"({group.docs} document(s); results, figures: {label}/)", ""]
    lines += [f"Time: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}, on {machine}. "
              f"Layout TP {cfg.parallel.tp} x CP {cfg.parallel.cp} x PP {cfg.parallel.pp}; made by "
              f"`megarope experiment`."]
    return "\n".join(lines) + "\n"

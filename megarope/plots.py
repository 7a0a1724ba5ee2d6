"""Every figure megarope draws. Matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import math
import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megarope.files import atomic_files  # noqa: E402
from megarope.units import format_tokens  # noqa: E402


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.5):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save(fig, path: str) -> None:
    """Write the PNG atomically: a crash never leaves half a picture at ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    try:
        with atomic_files([path], mode=0o666) as (tmp,):  # a figure is for sharing: the usual permissions
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def _finite(values):
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else float("nan") for v in values]


def _mark_bound(ax, record: dict, color: str, marked: set) -> None:
    """The scaling law's predicted bound of ``record``'s base, once per base: a dashed vertical line."""
    bound, base = record.get("predicted_bound"), record.get("base")
    if isinstance(bound, (int, float)) and base not in marked:
        marked.add(base)
        ax.axvline(bound, color=color, linestyle="--", alpha=0.7,
                   label=f"predicted bound, base {base:g}: {format_tokens(bound)}")


def ppl_vs_length(records: list[dict], path: str) -> None:
    """Perplexity against evaluation length (log-x, log-y), one curve per run, and the scaling law's
    predicted extrapolation bound of each base as a dashed vertical line in the colour of its first run."""
    fig, (ax,) = figure(1, width=7.5, height=5.0)
    runs = list(dict.fromkeys(r["run"] for r in records))
    marked = set()
    for i, name in enumerate(runs):
        rows = sorted((r for r in records if r["run"] == name), key=lambda r: r["length"])
        color = f"C{i % 10}"
        ax.plot([r["length"] for r in rows], _finite([r["ppl"] for r in rows]), marker="o", color=color, label=name)
        _mark_bound(ax, rows[0], color, marked)
    lengths = sorted({r["length"] for r in records})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_tokens(n) for n in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ppl = [v for v in _finite([r["ppl"] for r in records]) if v == v and v > 0]
    if ppl and max(ppl) / min(ppl) > 3:  # perplexity that explodes past a bound needs a log axis
        ax.set_yscale("log")
    ax.set(xlabel="evaluation length (tokens)", ylabel="perplexity", title="Perplexity vs length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path)


def loss_by_position(records: list[dict], path: str) -> None:
    """Loss per log-spaced position bucket at each run's longest evaluated length, at the bucket centres;
    the ticks are the bucket edges. Each base's predicted bound is marked as in ppl_vs_length."""
    fig, (ax,) = figure(1, width=7.5, height=5.0)
    runs = list(dict.fromkeys(r["run"] for r in records))
    edges, marked = set(), set()
    for i, name in enumerate(runs):
        rows = [r for r in records if r["run"] == name and r.get("buckets")]
        if not rows:
            continue
        last = max(rows, key=lambda r: r["length"])
        mids = [max(b["start"], 1) * 0.5 + b["end"] * 0.5 for b in last["buckets"]]
        edges.update(b["end"] for b in last["buckets"])
        ax.plot(mids, _finite([b["loss"] for b in last["buckets"]]), marker=".", color=f"C{i % 10}",
                label=f"{name} @ {format_tokens(last['length'])}")
        _mark_bound(ax, last, f"C{i % 10}", marked)
    ax.set_xscale("log", base=2)
    if edges:
        ax.set_xticks(sorted(edges), [format_tokens(n) for n in sorted(edges)])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set(xlabel="token position (bucket centre; ticks at bucket edges)", ylabel="loss (nats/token)",
           title="Loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path)


def passkey_heatmap(lengths: list[int], depths: list[float], accuracy: list[list[float]], path: str,
                    title: str = "Passkey retrieval accuracy") -> None:
    """accuracy[i][j]: depth i, length j; 0 = red, 1 = green, each cell annotated."""
    fig, (ax,) = figure(1, width=max(4.5, 1.1 * len(lengths) + 2.5), height=max(3.5, 0.6 * len(depths) + 2.0))
    image = ax.imshow(accuracy, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [format_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="context length (tokens)", ylabel="passkey depth (0 = start, 1 = end)", title=title)
    fig.colorbar(image, ax=ax, label="accuracy")
    save(fig, path)

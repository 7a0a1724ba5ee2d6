"""`megarope plan`: the scaling law as a decision, in a table, JSON and a plot."""

from __future__ import annotations

from megarope import scaling
from megarope.units import format_tokens


def make_plan(head_dim: int, train_len: int, tune_len: int | None, bases: list[float], targets: list[int],
              pretrain_base: float = scaling.LLAMA_PRETRAIN_BASE, rotary_percent: float = 1.0) -> dict:
    """Everything the planner reports, as one JSON-ready dict (the `--json` schema).

    The law's d is the rotary dimension: int(head_dim * rotary_percent) (all of the head for LLaMA).
    """
    tune_len = train_len if tune_len is None else tune_len
    d = scaling.rotary_dim(head_dim, rotary_percent)
    plans = [scaling.plan_base(d, train_len, b, tune_len, pretrain_base) for b in bases]
    return {
        "head_dim": head_dim,
        "rotary_percent": rotary_percent,
        "rotary_dim": d,
        "train_len": train_len,
        "tune_len": tune_len,
        "pretrain_base": pretrain_base,
        "critical_dim": scaling.critical_dimension(d, train_len, pretrain_base),
        "critical_base": scaling.critical_base(train_len, tune_len, pretrain_base),
        "small_base_thresholds": list(scaling.small_base_thresholds(tune_len)),
        "bases": [{"base": p.base, "regime": p.regime, "critical_dim": p.critical_dim,
                   "extrapolation_bound": p.extrapolation_bound} for p in plans],
        "targets": [{"target_len": t, "base": scaling.base_for_context(d, train_len, t, pretrain_base)}
                    for t in targets],
    }


def _base(b: float) -> str:
    return f"{b:.3g}" if b >= 1e5 else f"{b:,.0f}" if b >= 100 else f"{b:.3g}"


def format_plan(plan: dict) -> str:
    b1, b2, b3 = plan["small_base_thresholds"]
    rotary = "" if plan["rotary_dim"] == plan["head_dim"] else \
        f" (rotary dim {plan['rotary_dim']}: rotary_percent {plan['rotary_percent']:g})"
    lines = []
    if "lineage" in plan:  # `plan --from`: say where the pretraining numbers came from
        lines += [f"lineage of {plan['from']}:"] + [
            f"  {name.replace('_', ' ')}: {plan['lineage'][name]:,.6g}  ({source})"
            for name, source in plan["lineage"]["sources"].items()] + [""]
    lines += [
        f"head dim {plan['head_dim']}{rotary}, train length {plan['train_len']}, tune length {plan['tune_len']}"
        f" (pretraining base {_base(plan['pretrain_base'])})",
        f"critical dimension d_extra = {plan['critical_dim']}   (eq. 13)",
        f"critical base beta_0 = {_base(plan['critical_base'])}   (eq. 16a)",
        f"small-base thresholds beta_1/2/3 = {_base(b1)} / {_base(b2)} / {_base(b3)}   (eq. 16d)",
    ]
    if plan["bases"]:
        lines += ["", f"{'base':>12}  {'regime':<15}  {'crit. dim':>9}  {'bound (tokens)':>14}"]
        for row in plan["bases"]:
            lines.append(f"{_base(row['base']):>12}  {row['regime']:<15}  {row['critical_dim']:>9}"
                         f"  {format_tokens(row['extrapolation_bound']):>14}")
    if plan["targets"]:
        lines += ["", f"{'target':>12}  base needed (eq. 16b inverted)"]
        for row in plan["targets"]:
            note = "" if row["base"] > plan["critical_base"] else \
                "  (<= beta_0: the bound is then the tune length; tune longer instead)"
            lines.append(f"{format_tokens(row['target_len']):>12}  {_base(row['base'])}{note}")
    return "\n".join(lines)


def plot_plan(plan: dict, path: str) -> None:
    """Two panels: the period of each rotary pair against the lengths, and the bound against the base."""
    from megarope import plots

    d, train_len, tune_len = plan["rotary_dim"], plan["train_len"], plan["tune_len"]
    fig, (left, right) = plots.figure(2)
    pairs = list(range(d // 2))
    for row in plan["bases"] or [{"base": plan["pretrain_base"]}]:
        left.plot([2 * n for n in pairs], scaling.rotary_periods(d, row["base"]), label=f"base {_base(row['base'])}")
    left.axhline(train_len, color="k", linestyle="--", label=f"train length {train_len}")
    if tune_len != train_len:
        left.axhline(tune_len, color="gray", linestyle=":", label=f"tune length {tune_len}")
    left.axvline(plan["critical_dim"], color="r", linestyle="-.", label=f"d_extra = {plan['critical_dim']}")
    left.set(yscale="log", xlabel="dimension 2n", ylabel="period (tokens)", title="RoPE periods")
    left.legend(fontsize=7)

    beta_0 = plan["critical_base"]
    lo = max(1.5, min([b["base"] for b in plan["bases"]] + [beta_0]) / 10)
    hi = max([b["base"] for b in plan["bases"]] + [beta_0 * 1e3]) * 10
    grid = [lo * (hi / lo) ** (i / 199) for i in range(200)]
    bounds = [scaling.plan_base(d, train_len, b, tune_len, plan["pretrain_base"]).extrapolation_bound for b in grid]
    right.plot([b for b, t in zip(grid, bounds) if t], [t for t in bounds if t], label="bound (eq. 16b / T_tune)")
    right.axvline(beta_0, color="r", linestyle="-.", label=f"beta_0 = {_base(beta_0)}")
    right.axvline(plan["small_base_thresholds"][2], color="g", linestyle=":", label="beta_3 (no hard bound below)")
    for row in plan["bases"]:
        if row["extrapolation_bound"]:
            right.scatter([row["base"]], [row["extrapolation_bound"]], zorder=3)
            right.annotate(format_tokens(row["extrapolation_bound"]), (row["base"], row["extrapolation_bound"]), fontsize=7)
    right.set(xscale="log", yscale="log", xlabel="RoPE base", ylabel="extrapolation bound (tokens)",
              title="Predicted bound (Theorem 3)")
    right.legend(fontsize=7)
    plots.save(fig, path)


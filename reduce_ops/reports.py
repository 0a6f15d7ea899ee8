"""Figures of the Reduce method (paper Figs. 2a, 2b, 3 and the plan), written atomically.

Figures are built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot state), so building
one has no global side effect. Every `plot_*` function has a `*_figure` twin that returns the Figure
for inspection; `plot_*` saves it as PNG through reduce_ops.atomic (temporary name, then rename).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reduce_ops.atomic import write_file
from reduce_ops.errors import DataError
from reduce_ops.planning import MAP_COLUMNS

DPI = 150
RATE_LABEL = "fault rate (fraction of faulty PEs)"
EPOCHS_LABEL = "retraining needed (epochs of FAT)"
_POLICY_COLORS = ["C1", "C2", "C4", "C5", "C6", "C9", "C8", "C7"]
_TOP = 1.12  # y limit of the epoch axes as a multiple of max_amount; the top band holds "never"


# ---- writing ------------------------------------------------------------------------------------

def save_figure(fig: Figure, path) -> Path:
    """Write `fig` as a PNG atomically (readers never see a half-written file)."""
    return write_file(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


def _require(df: pd.DataFrame, columns, what: str) -> None:
    """Fail with one line naming the table and the missing columns."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise DataError(f"{what}: no rows")


def _fmt(x: float) -> str:
    """Short number for labels: 0.25, 1, 4."""
    return f"{x:g}"


# ---- Fig. 2a: accuracy vs fault rate, one curve per retraining amount ----------------------------

def select_amounts(amounts, max_curves: int = 6) -> list[float]:
    """A readable subset of retraining amounts: the smallest, the largest, log-spaced in between."""
    if max_curves < 2:
        raise DataError(f"select_amounts: max_curves must be >= 2, got {max_curves}")
    a = np.unique(np.asarray(amounts, dtype=float))
    a = a[np.isfinite(a)]
    if a.size <= max_curves:
        return [float(v) for v in a]
    chosen = {a[0], a[-1]}
    pos = a[a > 0]
    n_log = max_curves - (1 if a[0] == 0 else 0)
    # geometric targets (0.25, 0.5, 1, 2, 4 on a quarter-epoch grid), snapped in log space
    targets = np.geomspace(pos[0], pos[-1], n_log) if n_log > 1 else pos[-1:]
    for t in targets:
        chosen.add(pos[np.argmin(np.abs(np.log(pos) - np.log(t)))])
    return sorted(float(v) for v in chosen)  # at most max_curves: n_log targets (+ 0)


def accuracy_table(trials: pd.DataFrame, metric: str = "test_accuracy",
                   amounts=None) -> pd.DataFrame:
    """Accuracy per (amount, fault_rate) over repetitions: n_reps, mean, min, max."""
    _require(trials, ["fault_rate", "repetition", "amount", metric], "trials table")
    if amounts is not None:
        wanted = np.asarray(amounts, dtype=float)
        have = trials["amount"].to_numpy(dtype=float)
        absent = [_fmt(v) for v in wanted if not np.isclose(have, v).any()]
        if absent:
            raise DataError(f"trials table: no rows at retraining amount(s) {', '.join(absent)}")
        trials = trials[np.isclose(have[:, None], wanted[None, :]).any(axis=1)]
    g = trials.groupby(["amount", "fault_rate"], sort=True)[metric]
    out = g.agg(n_reps="count", mean="mean", min="min", max="max").reset_index()
    return out.astype({"amount": float, "fault_rate": float})


def accuracy_figure(trials, metric="test_accuracy", amounts=None, baseline=None,
                    constraint=None) -> Figure:
    """Fig. 2a: mean accuracy with min–max band vs fault rate, one viridis curve per amount.

    With a baseline or constraint, a second panel zooms on the band around them, where the curves
    show which amount first reaches the constraint and from which amount on more stops helping.
    """
    _require(trials, ["amount"], "trials table")
    chosen = select_amounts(trials["amount"]) if amounts is None else sorted(map(float, amounts))
    table = accuracy_table(trials, metric, chosen)
    refs = [v for v in (baseline, constraint) if v is not None]
    fig = Figure(figsize=(11.5 if refs else 7.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2 if refs else 1, squeeze=False).ravel()
    for ax in axes:
        for i, amount in enumerate(chosen):
            t = table[np.isclose(table["amount"], amount)]
            color = _viridis(i, len(chosen))
            label = {0: "0 (FAP only)", 1: "1 epoch"}.get(amount, f"{_fmt(amount)} epochs")
            ax.fill_between(t["fault_rate"], t["min"], t["max"], color=color, alpha=0.15, lw=0)
            ax.plot(t["fault_rate"], t["mean"], "o-", color=color, ms=4, lw=1.8, label=label)
        if baseline is not None:
            ax.axhline(baseline, color="black", ls="--", lw=1, label=f"baseline ({baseline:.4g})")
        if constraint is not None:
            ax.axhline(constraint, color="tab:red", ls="--", lw=1.2,
                       label=f"constraint ({constraint:.4g})")
        ax.set_xlabel(RATE_LABEL)
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_title("all fault rates", fontsize=10)
    if refs:
        hi = max(refs + [float(table["max"].max())])
        span = max(hi - min(refs), 0.005)
        axes[1].set_ylim(min(refs) - 2.5 * span, hi + 0.3 * span)
        axes[1].set_title("zoom on the baseline / constraint", fontsize=10)
    fig.suptitle(f"{metric.replace('_', ' ').capitalize()} after FAP + k epochs of FAT "
                 "(mean; band = min–max over repetitions)", fontsize=11)
    axes[-1].legend(title="retraining", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
                    title_fontsize=9, frameon=False)
    return fig


def plot_accuracy_vs_fault_rate(trials, path, metric="test_accuracy", amounts=None, baseline=None,
                                constraint=None) -> Path:
    """Save Fig. 2a (see `accuracy_figure`) as a PNG at `path`."""
    return save_figure(accuracy_figure(trials, metric, amounts, baseline, constraint), path)


def _viridis(i: int, n: int):
    """i-th of n colours from viridis, stopping before the pale yellow end (legible on white)."""
    return colormaps["viridis"](0.8 * i / max(n - 1, 1))


# ---- Fig. 2b: retraining needed vs fault rate, one series per accuracy level ---------------------

def _dodge(rates: np.ndarray, n: int) -> float:
    """Horizontal offset between series so that error bars at the same rate do not overlap."""
    gaps = np.diff(np.unique(rates))
    return 0.0 if gaps.size == 0 or n < 2 else 0.35 * gaps.min() / (n - 1)


def needed_figure(res_map: pd.DataFrame, max_amount: float, constraint_level=None) -> Figure:
    """Fig. 2b: mean need with min–max bars per level; never-reached shown at the top edge."""
    _require(res_map, MAP_COLUMNS, "resilience map")
    levels = sorted(res_map["level"].unique())
    dx = _dodge(res_map["fault_rate"].to_numpy(float), len(levels))
    top = max_amount * _TOP if max_amount > 0 else 1.0
    never_y = max_amount + 0.55 * (top - max_amount) if max_amount > 0 else 0.8
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(max_amount, color="grey", ls=":", lw=1.2)
    ax.text(0.005, max_amount, " budget cap", transform=ax.get_yaxis_transform(),
            va="bottom", ha="left", fontsize=7, color="dimgrey")
    for i, level in enumerate(levels):
        m = res_map[res_map["level"] == level].sort_values("fault_rate")
        x = m["fault_rate"].to_numpy(float) + (i - (len(levels) - 1) / 2) * dx
        color = _viridis(i, len(levels))
        is_c = constraint_level is not None and math.isclose(level, constraint_level)
        lw, ms = (2.8, 7) if is_c else (1.3, 5)
        ok = m["n_reached"].to_numpy() > 0
        full = ok & (m["n_never"].to_numpy() == 0)
        mean = m["mean"].to_numpy(float)
        err = np.vstack([mean - m["min"].to_numpy(float), m["max"].to_numpy(float) - mean])
        label = f"accuracy ≥ {level:.4g}" + (" (constraint)" if is_c else "")
        ax.plot(x[ok], mean[ok], "-", color=color, lw=lw, label=label, zorder=3 if is_c else 2)
        ax.errorbar(x[ok], mean[ok], yerr=err[:, ok], fmt="none", ecolor=color, elinewidth=1,
                    capsize=3)
        ax.plot(x[full], mean[full], "o", color=color, ms=ms, zorder=4)
        part = ok & ~full  # some repetitions never reached: mean over the others, hollow
        ax.plot(x[part], mean[part], "o", mfc="white", mec=color, mew=1.6, ms=ms, zorder=4)
        ax.plot(x[~ok], np.full((~ok).sum(), never_y), "^", color=color, ms=ms, zorder=4)
        for xi, yi, row in zip(x[part], mean[part], m[part].itertuples()):
            ax.annotate(f"{row.n_never}/{row.n_reps}", (xi, yi), xytext=(5, 2),
                        textcoords="offset points", fontsize=7, color="0.2")
    ax.set_ylim(-0.04 * top, top)
    ax.set_xlabel(RATE_LABEL)
    ax.set_ylabel(EPOCHS_LABEL)
    ax.set_title("Retraining needed per accuracy level (mean, bars = min–max over repetitions)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], ls="", marker="o", mfc="white", mec="black",
               label="some reps never reached\n(n_never/n_reps)"),
        Line2D([], [], ls="", marker="^", color="black",
               label=f"no repetition reached\nwithin {_fmt(max_amount)} epochs"),
        Line2D([], [], ls=":", color="grey", label="budget cap"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              frameon=False)
    return fig


def plot_retraining_needed(res_map, path, max_amount, constraint_level=None) -> Path:
    """Save Fig. 2b (see `needed_figure`) as a PNG at `path`."""
    return save_figure(needed_figure(res_map, max_amount, constraint_level), path)


# ---- the plan: aggregate needs, monotone curve, chips --------------------------------------------

def plan_figure(points: pd.DataFrame, curve, plan: pd.DataFrame, statistic,
                constraint_level) -> Figure:
    """Measured aggregate needs, the fitted monotone curve, the infeasible region and the chips."""
    _require(points, ["fault_rate", "needed"], "aggregate needs")
    _require(plan, ["fault_rate", "planned_epochs", "feasible"], "plan")
    max_amount = float(curve.max_amount)
    top = max_amount * _TOP if max_amount > 0 else 1.0
    edge = max_amount + 0.55 * (top - max_amount) if max_amount > 0 else 0.8
    rates = np.concatenate([points["fault_rate"].to_numpy(float),
                            plan["fault_rate"].to_numpy(float)])
    lo, hi = float(np.nanmin(rates)), float(np.nanmax(rates))
    pad = 0.03 * (hi - lo or 1.0)
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ax.axhline(max_amount, color="grey", ls=":", lw=1.2, label="budget cap")
    if curve.max_feasible_rate < hi + pad:
        start = max(curve.max_feasible_rate, lo - pad)
        ax.axvspan(start, hi + pad, color="tab:red", alpha=0.08, lw=0, label="infeasible")
    if math.isfinite(curve.max_feasible_rate):
        grid = np.linspace(curve.rates[0], curve.max_feasible_rate, 200)
        ax.plot(grid, curve(grid), "-", color="tab:blue", lw=2, label="monotone fit")
    p = points.sort_values("fault_rate")
    need = p["needed"].to_numpy(float)
    fin = np.isfinite(need)
    if {"min", "max"} <= set(p.columns):
        lo_v, hi_v = p["min"].to_numpy(float), p["max"].to_numpy(float)
        ok = fin & np.isfinite(lo_v) & np.isfinite(hi_v)  # bars only where all three are finite
        err = np.clip(np.vstack([need[ok] - lo_v[ok], hi_v[ok] - need[ok]]), 0, None)
        ax.errorbar(p["fault_rate"][ok], need[ok], yerr=err, fmt="none", ecolor="tab:blue",
                    alpha=0.5, capsize=3, label="min–max over repetitions")
    if fin.any():
        ax.plot(p["fault_rate"][fin], need[fin], "o", color="tab:blue", ms=7, mfc="white",
                mew=1.6, label=f"measured ({statistic})", zorder=4)
    if (~fin).any():
        ax.plot(p["fault_rate"][~fin], np.full((~fin).sum(), edge), "x", color="tab:blue", ms=8,
                mew=2, label="not planned: too few\nrepetitions reached", zorder=4)
    feas = plan["feasible"].astype(bool).to_numpy()
    if feas.any():
        ax.plot(plan["fault_rate"][feas], plan["planned_epochs"][feas], ".", color="black", ms=6,
                alpha=0.7, label=f"chips planned ({feas.sum()})", zorder=5)
    if (~feas).any():
        ax.plot(plan["fault_rate"][~feas], np.full((~feas).sum(), edge), "|", color="tab:red",
                ms=12, mew=1.5, label=f"chips infeasible ({(~feas).sum()})", zorder=5)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(-0.04 * top, top)
    ax.set_xlabel(RATE_LABEL)
    ax.set_ylabel(EPOCHS_LABEL)
    ax.set_title(f"Retraining plan: {statistic} need to reach validation accuracy ≥ "
                 f"{constraint_level:.4g}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return fig


def plot_plan_curve(points, curve, plan, path, statistic, constraint_level) -> Path:
    """Save the plan figure (see `plan_figure`) as a PNG at `path`."""
    return save_figure(plan_figure(points, curve, plan, statistic, constraint_level), path)


# ---- Fig. 3: policies compared ------------------------------------------------------------------

def policy_figure(per_chip: pd.DataFrame, summary: pd.DataFrame, constraint_level) -> Figure:
    """Fig. 3: per-policy test accuracy vs fault rate of the chips each ships, then chips shipped
    (and meeting the constraint on test) vs total retraining."""
    _require(per_chip, ["policy", "fault_rate", "test_accuracy", "shipped", "meets_on_test"],
             "per-chip results")
    _require(summary, ["policy", "n_shipped", "n_meet_on_test", "total_epochs"],
             "policy summary")
    policies = list(summary["policy"])
    n = len(policies) + 1
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    # one colour per policy in the summary panel; tab10 without blue/red (= met / not met)
    colors = [_POLICY_COLORS[i % len(_POLICY_COLORS)] for i in range(len(policies))]
    for ax, row in zip(axes, summary.itertuples()):
        d = per_chip[per_chip["policy"] == row.policy]
        shipped = d["shipped"].astype(bool).to_numpy()
        meets = d["meets_on_test"].astype(bool).to_numpy()
        ax.plot(d["fault_rate"][meets], d["test_accuracy"][meets], "o", color="tab:blue", ms=4,
                alpha=0.8, label="shipped, meets on test")
        miss = shipped & ~meets
        ax.plot(d["fault_rate"][miss], d["test_accuracy"][miss], "x", color="tab:red", ms=5,
                label="shipped, misses on test")
        ax.axhline(constraint_level, color="black", ls="--", lw=1,
                   label=f"constraint ({constraint_level:.4g})")
        if (~shipped).any():      # not shipped: marked along the bottom edge
            lo, hi = ax.get_ylim()
            ax.plot(d["fault_rate"][~shipped], np.full(int((~shipped).sum()), lo), "v",
                    color="0.45", ms=5, clip_on=False, label="not shipped")
            ax.set_ylim(lo, hi)
        ax.set_title(f"{row.policy}\nships {row.n_shipped}/{len(d)}, {row.n_meet_on_test} meet "
                     f"· {_fmt(row.total_epochs)} epochs", fontsize=9)
        ax.set_xlabel(RATE_LABEL, fontsize=8)
        ax.set_ylabel("test accuracy (own scale per panel)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    ax = axes[len(policies)]
    for row, color in zip(summary.itertuples(), colors):
        ax.plot(row.total_epochs, row.n_shipped, "o", color=color, ms=8, label=str(row.policy))
        ax.plot(row.total_epochs, row.n_meet_on_test, "o", mfc="white", mec=color, mew=1.5, ms=8)
    ax.set_title("chips shipped (filled) and meeting the\nconstraint on test (hollow) vs epochs",
                 fontsize=9)
    ax.set_xlabel("total retraining (epochs, sum over chips)", fontsize=8)
    ax.set_ylabel("chips", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def plot_policy_comparison(per_chip, summary, path, constraint_level) -> Path:
    """Save Fig. 3 (see `policy_figure`) as a PNG at `path`."""
    return save_figure(policy_figure(per_chip, summary, constraint_level), path)


# ---- eFAT: the grouping -------------------------------------------------------------------------

def groups_figure(groups: pd.DataFrame, plan: pd.DataFrame) -> Figure:
    """Each chip at its own fault rate and planned epochs; each group of two or more joined to a
    star at its fused fault rate and the epochs its one FAT run is planned for."""
    for df, cols, what in ((groups, ["members", "n_members", "fused_fault_rate",
                                     "planned_epochs", "members_planned_epochs"], "groups"),
                           (plan, ["chip_id", "fault_rate", "planned_epochs", "feasible"],
                            "plan")):
        missing = [c for c in cols if c not in df.columns]   # no rows is fine: nothing planned
        if missing:
            raise DataError(f"{what}: missing column(s) {', '.join(missing)}")
    own = plan.set_index("chip_id")
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    feas = plan["feasible"].astype(bool)
    ax.plot(plan.loc[feas, "fault_rate"], plan.loc[feas, "planned_epochs"], "o", color="0.6",
            ms=4, label="chip: its own plan", zorder=2)
    shared = groups[groups["n_members"] > 1]
    for i, row in enumerate(shared.itertuples()):
        color = _POLICY_COLORS[i % len(_POLICY_COLORS)]
        members = own.loc[list(row.members)]
        for r, e in zip(members["fault_rate"], members["planned_epochs"]):
            ax.plot([r, row.fused_fault_rate], [e, row.planned_epochs], "-", color=color,
                    lw=0.8, alpha=0.6, zorder=1)
        ax.plot(row.fused_fault_rate, row.planned_epochs, "*", color=color, ms=11, mec="black",
                mew=0.5, zorder=3, label="group: fused map" if i == 0 else None)
    before = float(groups["members_planned_epochs"].sum())
    after = float(groups["planned_epochs"].sum())
    ax.set_title(f"eFAT: {int(shared['n_members'].sum())} chips in {len(shared)} groups; "
                 f"planned epochs {_fmt(before)} -> {_fmt(after)}", fontsize=10)
    ax.set_xlabel(RATE_LABEL)
    ax.set_ylabel("planned retraining (epochs of FAT)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_groups(groups, plan, path) -> Path:
    """Save the grouping figure (see `groups_figure`) as a PNG at `path`."""
    return save_figure(groups_figure(groups, plan), path)


# ---- robustness: accuracy vs bit error rate -------------------------------------------------------

def robustness_figure(summary: pd.DataFrame, clean: dict[str, float] | None = None) -> Figure:
    """Accuracy of each variant vs BER (log axis), one panel per fault model: the mean over
    repetitions, the band their min-max; a dotted line at each variant's fault-free int8
    accuracy."""
    _require(summary, ["variant", "fault_model", "ber", "mean", "min", "max"], "robustness")
    models = list(dict.fromkeys(summary["fault_model"]))
    variants = list(dict.fromkeys(summary["variant"]))
    fig = Figure(figsize=(5.2 * len(models), 4.2), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False).ravel()
    for ax, model in zip(axes, models):
        for i, variant in enumerate(variants):
            color = _POLICY_COLORS[i % len(_POLICY_COLORS)] if len(variants) > 1 else "tab:blue"
            d = summary[(summary["fault_model"] == model) & (summary["variant"] == variant)]
            d = d.sort_values("ber")
            ax.fill_between(d["ber"], d["min"], d["max"], color=color, alpha=0.15, lw=0)
            ax.plot(d["ber"], d["mean"], "o-", color=color, ms=4, label=variant)
            if clean and variant in clean:
                ax.axhline(clean[variant], color=color, ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("bit error rate (per stored weight bit)")
        ax.set_ylabel("test accuracy (int8 weights)")
        ax.set_title(f"{model.replace('_', '-')} faults (mean, band = min-max; dotted: no "
                     f"faults)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower left")
    return fig


def plot_robustness(summary, path, clean=None) -> Path:
    """Save the robustness figure (see `robustness_figure`) as a PNG at `path`."""
    return save_figure(robustness_figure(summary, clean), path)

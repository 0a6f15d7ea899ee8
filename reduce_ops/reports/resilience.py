"""Figs. 2a and 2b of the resilience stage: accuracy against fault rate per retraining amount,
and the retraining needed per accuracy level."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from reduce_ops.errors import DataError
from reduce_ops.needs import MAP_COLUMNS
from reduce_ops.reports.common import (
    EPOCHS_LABEL,
    RATE_LABEL,
    TOP,
    fmt,
    md_table,
    require,
    save_figure,
)


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
    require(trials, ["fault_rate", "repetition", "amount", metric], "trials table")
    if amounts is not None:
        wanted = np.asarray(amounts, dtype=float)
        have = trials["amount"].to_numpy(dtype=float)
        absent = [fmt(v) for v in wanted if not np.isclose(have, v).any()]
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
    require(trials, ["amount"], "trials table")
    chosen = select_amounts(trials["amount"]) if amounts is None else sorted(map(float, amounts))
    table = accuracy_table(trials, metric, chosen)
    refs = [v for v in (baseline, constraint) if v is not None]
    fig = Figure(figsize=(11.5 if refs else 7.5, 4.6), layout="constrained")
    axes = fig.subplots(1, 2 if refs else 1, squeeze=False).ravel()
    for ax in axes:
        for i, amount in enumerate(chosen):
            t = table[np.isclose(table["amount"], amount)]
            color = _viridis(i, len(chosen))
            label = {0: "0 (FAP only)", 1: "1 epoch"}.get(amount, f"{fmt(amount)} epochs")
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
    require(res_map, MAP_COLUMNS, "resilience map")
    levels = sorted(res_map["level"].unique())
    dx = _dodge(res_map["fault_rate"].to_numpy(float), len(levels))
    top = max_amount * TOP if max_amount > 0 else 1.0
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
               label=f"no repetition reached\nwithin {fmt(max_amount)} epochs"),
        Line2D([], [], ls=":", color="grey", label="budget cap"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8,
              frameon=False)
    return fig


def plot_retraining_needed(res_map, path, max_amount, constraint_level=None) -> Path:
    """Save Fig. 2b (see `needed_figure`) as a PNG at `path`."""
    return save_figure(needed_figure(res_map, max_amount, constraint_level), path)


def markdown_summary(grid: pd.DataFrame, res_map: pd.DataFrame, level: float,
                     metric: str = "val_accuracy") -> str:
    """The resilience result as the run page shows it (markdown): accuracy (mean, min-max over
    the repetitions) per fault rate after each of a few retraining amounts of the grid, and
    the retraining needed at each fault rate to reach `level` (the nearest level mapped)."""
    amounts = select_amounts(grid["amount"], 6)
    acc = accuracy_table(grid, metric, amounts)
    rates = sorted(acc["fault_rate"].unique())
    rows = []
    for rate in rates:
        at = acc[acc["fault_rate"] == rate].set_index("amount")
        rows.append([f"{rate:.4f}"] + [
            f"{at.loc[a, 'mean']:.4f} ({at.loc[a, 'min']:.3f}-{at.loc[a, 'max']:.3f})"
            if a in at.index else "" for a in amounts])
    text = (f"**{metric} after k epochs of FAT** (mean, min-max over repetitions):\n\n"
            + md_table(["fault rate", *(f"{fmt(a)} epochs" for a in amounts)], rows))
    if len(res_map):
        levels = res_map["level"].unique()
        nearest = levels[np.argmin(np.abs(levels - level))]
        m = res_map[res_map["level"] == nearest].sort_values("fault_rate")
        need = [[f"{r.fault_rate:.4f}", f"{r.n_reached}/{r.n_reps}",
                 *(f"{v:.3f}" if math.isfinite(v) else "-" for v in (r.min, r.mean, r.max))]
                for r in m.itertuples(index=False)]
        text += (f"\n\n**Retraining needed to reach {metric} {nearest:.4f}** (epochs; "
                 f"repetitions that reached it):\n\n"
                 + md_table(["fault rate", "reached", "min", "mean", "max"], need))
    return text

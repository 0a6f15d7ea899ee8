"""The plan's figure: each rate's need, the monotone curve the plan reads, every chip's plan."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from reduce_ops.planning import on_spare_budget
from reduce_ops.reports.common import EPOCHS_LABEL, RATE_LABEL, TOP, require, save_figure


def plan_figure(points: pd.DataFrame, curve, plan: pd.DataFrame, statistic,
                constraint_level) -> Figure:
    """Measured aggregate needs, the fitted monotone curve, the infeasible region and the chips."""
    require(points, ["fault_rate", "needed"], "aggregate needs")
    require(plan, ["fault_rate", "planned_epochs", "feasible"], "plan")
    max_amount = float(curve.max_amount)
    top = max_amount * TOP if max_amount > 0 else 1.0
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
        ax.axvspan(start, hi + pad, color="tab:red", alpha=0.08, lw=0, label="beyond the edge")
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
    spare = on_spare_budget(plan)
    if (feas & ~spare).any():
        ax.plot(plan["fault_rate"][feas & ~spare], plan["planned_epochs"][feas & ~spare], ".",
                color="black", ms=6, alpha=0.7, label=f"chips planned ({(feas & ~spare).sum()})",
                zorder=5)
    if spare.any():
        ax.plot(plan["fault_rate"][spare], plan["planned_epochs"][spare], "^", color="tab:orange",
                ms=6, label=f"beyond the edge, to the cap\non the spare budget ({spare.sum()})",
                zorder=5)
    if (~feas).any():
        ax.plot(plan["fault_rate"][~feas], np.full((~feas).sum(), edge), "|", color="tab:red",
                ms=12, mew=1.5, label=f"chips rejected untrained ({(~feas).sum()})", zorder=5)
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

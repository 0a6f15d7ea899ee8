"""Fig. 3 of the compare stage: the policies' epochs and the chips each ships."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from reduce_ops.reports.common import POLICY_COLORS, RATE_LABEL, fmt, require, save_figure


def policy_figure(per_chip: pd.DataFrame, summary: pd.DataFrame, constraint_level) -> Figure:
    """Fig. 3: per-policy test accuracy vs fault rate of the chips each ships, then chips shipped
    (and meeting the constraint on test) vs total retraining."""
    require(per_chip, ["policy", "fault_rate", "test_accuracy", "shipped", "meets_on_test"],
             "per-chip results")
    require(summary, ["policy", "n_shipped", "n_meet_on_test", "total_epochs"],
             "policy summary")
    policies = list(summary["policy"])
    n = len(policies) + 1
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.0 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    # one colour per policy in the summary panel; tab10 without blue/red (= met / not met)
    colors = [POLICY_COLORS[i % len(POLICY_COLORS)] for i in range(len(policies))]
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
                     f"· {fmt(row.total_epochs)} epochs", fontsize=9)
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


def operating_figure(points: pd.DataFrame, goal: tuple[float, float] | None = (0.85, 0.03)
                     ) -> Figure:
    """Yield against escape rate, one curve per decision rule as its guard band varies, the
    default rule's point marked; `goal` (yield at least, escapes at most) shaded."""
    require(points, ["family", "setting", "yield", "escape_rate", "is_default"],
            "operating characteristic")
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.subplots()
    if goal is not None:
        ax.axhspan(goal[0] * 100, 101, xmin=0, xmax=1, color="tab:green", alpha=0.06)
        ax.axvline(goal[1] * 100, color="tab:green", lw=1, ls=":")
        ax.axhline(goal[0] * 100, color="tab:green", lw=1, ls=":",
                   label=f"goal: yield >= {goal[0]:.0%}, escapes <= {goal[1]:.0%} of shipped")
    families = [f for f in dict.fromkeys(points["family"]) if f != "default"]
    for family, color in zip(families, ("C1", "C2", "C0", "C4", "C5")):
        d = points[(points["family"] == family) & points["escape_rate"].notna()]
        if d.empty:
            continue
        ax.plot(d["escape_rate"] * 100, d["yield"] * 100, "o-", color=color, ms=4, lw=1.2,
                label=family)
        for r in d.iloc[::2].to_dict("records"):
            ax.annotate(r["setting"], (r["escape_rate"] * 100, r["yield"] * 100), fontsize=6,
                        color=color, xytext=(3, 3), textcoords="offset points")
    default = points[points["is_default"] & points["escape_rate"].notna()]
    if not default.empty:
        d = default.iloc[0]
        ax.plot(d["escape_rate"] * 100, d["yield"] * 100, "*", color="black", ms=14,
                label=f"default ({d['n_shipped']} shipped, {d['total_epochs']:g} epochs)")
    ax.set_xlabel("escapes (% of shipped chips missing the constraint on test)")
    ax.set_ylabel("yield (% of recoverable chips shipped and meeting)")
    ax.set_title("Operating characteristic: each point is the whole Reduce run (plan + "
                 "verification)\nwith that guard band, on the chips' recorded FAT curves",
                 fontsize=9)
    ax.set_ylim(0, 101)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_operating_characteristic(points: pd.DataFrame, path) -> Path:
    """Save the operating characteristic (see `operating_figure`) as a PNG at `path`."""
    return save_figure(operating_figure(points), path)

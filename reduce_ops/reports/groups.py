"""The group stage's figure: eFAT groups against the chips' own plans."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from reduce_ops.errors import DataError
from reduce_ops.reports.common import POLICY_COLORS, RATE_LABEL, fmt, save_figure


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
        color = POLICY_COLORS[i % len(POLICY_COLORS)]
        members = own.loc[list(row.members)]
        for r, e in zip(members["fault_rate"], members["planned_epochs"]):
            ax.plot([r, row.fused_fault_rate], [e, row.planned_epochs], "-", color=color,
                    lw=0.8, alpha=0.6, zorder=1)
        ax.plot(row.fused_fault_rate, row.planned_epochs, "*", color=color, ms=11, mec="black",
                mew=0.5, zorder=3, label="group: fused map" if i == 0 else None)
    before = float(groups["members_planned_epochs"].sum())
    after = float(groups["planned_epochs"].sum())
    ax.set_title(f"eFAT: {int(shared['n_members'].sum())} chips in {len(shared)} groups; "
                 f"planned epochs {fmt(before)} -> {fmt(after)}", fontsize=10)
    ax.set_xlabel(RATE_LABEL)
    ax.set_ylabel("planned retraining (epochs of FAT)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_groups(groups, plan, path) -> Path:
    """Save the grouping figure (see `groups_figure`) as a PNG at `path`."""
    return save_figure(groups_figure(groups, plan), path)

"""The robustness stage's figure: accuracy against bit error rate, one curve per model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from reduce_ops.reports.common import POLICY_COLORS, require, save_figure


def robustness_figure(summary: pd.DataFrame, clean: dict[str, float] | None = None) -> Figure:
    """Accuracy of each variant vs BER (log axis), one panel per fault model: the mean over
    repetitions, the band their min-max; a dotted line at each variant's fault-free int8
    accuracy."""
    require(summary, ["variant", "fault_model", "ber", "mean", "min", "max"], "robustness")
    models = list(dict.fromkeys(summary["fault_model"]))
    variants = list(dict.fromkeys(summary["variant"]))
    fig = Figure(figsize=(5.2 * len(models), 4.2), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False).ravel()
    for ax, model in zip(axes, models):
        for i, variant in enumerate(variants):
            color = POLICY_COLORS[i % len(POLICY_COLORS)] if len(variants) > 1 else "tab:blue"
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

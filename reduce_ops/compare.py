"""Fixed-epoch policies vs Reduce on one fleet (the paper's Fig. 3), from ONE FAT run per chip.

Every policy gives a chip some retraining amount; a chip's accuracy after E epochs is the same
whichever policy asked for E (same baseline, fault map, seed and batch order), so each chip is
fine-tuned once up to the largest amount any policy gives it, with accuracy measured at every
amount some policy uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from reduce_ops.config import FatConfig, HardwareConfig
from reduce_ops.hardware import FaultMap
from reduce_ops.names import TEST_ACCURACY
from reduce_ops.progress import Progress
from reduce_ops.fault_aware import FatCurve, fat_curve

PER_CHIP_COLUMNS = ["policy", "chip_id", "fault_rate", "epochs", "accuracy", "met", "rejected",
                    "train_seconds"]
SUMMARY_COLUMNS = ["policy", "n_met", "n_chips", "pass_rate", "n_rejected", "total_epochs",
                   "total_seconds"]


def fixed_policy_name(epochs: float) -> str:
    return f"fixed-{epochs:g}"


def policy_epochs(fixed: list[float], reduce_plans: dict[str, pd.DataFrame],
                  chip_ids: list[str]) -> dict[str, dict[str, float]]:
    """{policy: {chip_id: epochs, NaN = rejected}} for fixed policies and each Reduce plan."""
    out: dict[str, dict[str, float]] = {fixed_policy_name(e): {c: float(e) for c in chip_ids}
                                        for e in fixed}
    for name, plan in reduce_plans.items():
        by_chip = dict(zip(plan["chip_id"], plan["planned_epochs"].astype(float)))
        out[name] = {c: by_chip.get(c, math.nan) for c in chip_ids}
    return out


def run_chips(baseline: nn.Module, data: Any, fleet: Sequence[FaultMap],
              amounts: dict[str, list[float]], fat: FatConfig, hardware: HardwareConfig,
              device: torch.device | str = "cpu",
              progress: Progress | None = None) -> list[tuple[FaultMap, FatCurve]]:
    """Each chip fine-tuned ONCE up to its largest amount, test accuracy at every amount."""
    out = []
    for fmap in fleet:
        if progress is not None:
            progress.start(f"chip {fmap.chip_id}")
        curve = fat_curve(baseline, fmap, hardware.layer_types, data, amounts[fmap.chip_id], fat,
                          device, splits=("test",))
        out.append((fmap, curve))
        if progress is not None:
            progress.done(f"chip {fmap.chip_id}", f"fault rate {fmap.fault_rate:.3f}, "
                          f"{max(curve.amounts):g} epochs")
    return out


def per_chip_table(curves: Sequence[tuple[FaultMap, FatCurve]],
                   policies: dict[str, dict[str, float]], level: float) -> pd.DataFrame:
    """One row per (policy, chip): epochs given, accuracy reached, constraint met, rejected."""
    rows = []
    for policy, epochs_by_chip in policies.items():
        for fmap, curve in curves:
            e = epochs_by_chip[fmap.chip_id]
            if math.isnan(e):   # Reduce rejected the chip: no retraining, not shipped
                rows.append((policy, fmap.chip_id, fmap.fault_rate, 0.0, math.nan, False, True,
                             0.0))
                continue
            acc = curve.at(e, TEST_ACCURACY)
            rows.append((policy, fmap.chip_id, fmap.fault_rate, e, acc, bool(acc >= level), False,
                         curve.train_seconds[curve.amounts.index(e)]))
    return pd.DataFrame(rows, columns=PER_CHIP_COLUMNS)


def summarize(per_chip: pd.DataFrame) -> pd.DataFrame:
    """Per policy: chips meeting the constraint, pass rate, rejected, total epochs and seconds."""
    rows = []
    for policy, g in per_chip.groupby("policy", sort=False):
        n = len(g)
        rows.append((policy, int(g["met"].sum()), n, float(g["met"].sum() / n),
                     int(g["rejected"].sum()), float(g["epochs"].sum()),
                     float(g["train_seconds"].sum())))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def amounts_per_chip(policies: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """Every amount some policy gives each chip (0 included: the FAP-only accuracy)."""
    out: dict[str, set[float]] = {}
    for epochs_by_chip in policies.values():
        for chip, e in epochs_by_chip.items():
            out.setdefault(chip, {0.0})
            if not math.isnan(e):
                out[chip].add(float(e))
    return {c: sorted(a) for c, a in out.items()}

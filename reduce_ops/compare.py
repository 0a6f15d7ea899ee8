"""Fixed-epoch policies vs Reduce on one fleet (the paper's Fig. 3), from ONE FAT run per chip.

Every policy gives a chip some retraining amount; a chip's accuracy after E epochs is the same
whichever policy asked for E (same baseline, fault map, seed and batch order), so each chip is
fine-tuned once up to the largest amount any policy gives it, with accuracy measured at every
amount some policy uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from reduce_ops.config import FatConfig, HardwareConfig
from reduce_ops.hardware import FaultMap
from reduce_ops.training import fap_then_fat, split_accuracies

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


@dataclass
class ChipCurve:
    """One chip's single FAT run: accuracy and training seconds at each measured amount."""

    chip_id: str
    fault_rate: float
    accuracy: dict[float, float]
    seconds: dict[float, float]


def run_chip(baseline: nn.Module, data: Any, fmap: FaultMap, amounts: list[float],
             fat: FatConfig, hardware: HardwareConfig,
             device: torch.device | str = "cpu") -> ChipCurve:
    """FAT once up to max(amounts) with test accuracy at every amount (0 = FAP only)."""
    amounts = sorted(set(amounts))
    _, _, cps = fap_then_fat(baseline, fmap, hardware.layer_types, data, max(amounts), fat,
                             device, checkpoints=amounts,
                             evaluate_fn=lambda m: split_accuracies(m, data, ("test",), device))
    return ChipCurve(fmap.chip_id, fmap.fault_rate,
                     {cp.amount: cp.metrics["test_accuracy"] for cp in cps},
                     {cp.amount: cp.seconds for cp in cps})


def per_chip_table(curves: list[ChipCurve], policies: dict[str, dict[str, float]],
                   level: float) -> pd.DataFrame:
    """One row per (policy, chip): epochs given, accuracy reached, constraint met, rejected."""
    rows = []
    for policy, epochs_by_chip in policies.items():
        for c in curves:
            e = epochs_by_chip[c.chip_id]
            if math.isnan(e):   # Reduce rejected the chip: no retraining, not shipped
                rows.append((policy, c.chip_id, c.fault_rate, 0.0, math.nan, False, True, 0.0))
                continue
            acc = c.accuracy[e]
            rows.append((policy, c.chip_id, c.fault_rate, e, acc, bool(acc >= level), False,
                         c.seconds[e]))
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

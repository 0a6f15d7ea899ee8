"""Policies compared on one fleet (the paper's Fig. 3): fixed epochs, the verified Reduce plan and
a per-chip oracle, all read off ONE fault-aware training run per chip.

A chip's accuracy after E epochs is the same whichever policy asked for E (same baseline, fault
map, seed and batch order), so each chip is fine-tuned once, measured on the validation and test
splits at every amount some policy asks for, and every policy's outcome is read off that run.
Every policy ships a chip only when its model passes the same check on the validation split
(accuracy >= decision level + margin); the test split only says whether a shipped chip meets
the constraint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from reduce_ops.config import FatConfig, HardwareConfig
from reduce_ops.fault_aware import FatSession
from reduce_ops.hardware import FaultMap
from reduce_ops.names import TEST_ACCURACY, VAL_ACCURACY
from reduce_ops.planning import check_amounts, verify
from reduce_ops.progress import Progress

PER_CHIP_COLUMNS = ["policy", "chip_id", "fault_rate", "planned_epochs", "epochs", "shipped",
                    "val_accuracy", "test_accuracy", "meets_on_test", "meets_unchecked",
                    "rejected_by"]
# n_meet_unchecked: trained chips at or above the test level whether shipped or not (what a
# policy that shipped without any check would count; only the test split knows it)
SUMMARY_COLUMNS = ["policy", "n_chips", "n_shipped", "n_meet_on_test", "meet_rate",
                   "n_meet_unchecked", "total_epochs", "epochs_per_shipped",
                   "cheapest_fixed_as_many", "epochs_ratio_to_it"]
FIXED, REDUCE, ORACLE = "fixed", "reduce", "oracle"


@dataclass(frozen=True)
class Policy:
    """How many epochs a policy gives each chip: `epochs` for a fixed policy, the plan's
    amounts for Reduce (NaN = rejected by the plan); the oracle picks its own."""

    name: str
    kind: str
    epochs: dict[str, float]


@dataclass(frozen=True)
class Rule:
    """The check every policy applies before it ships a chip, and what judges it."""

    decision_level: float      # validation accuracy level
    constraint_level: float    # test accuracy level (reported)
    margin: float              # verify.margin
    step: float                # verify.step, epochs
    cap: float                 # plan.budget_cap, epochs


def fixed_policy_name(epochs: float) -> str:
    return f"fixed-{epochs:g}"


def policies(fixed: Sequence[float], reduce_plans: dict[str, pd.DataFrame],
             chip_ids: Sequence[str]) -> list[Policy]:
    """Fixed policies, one verified Reduce policy per plan, and the oracle."""
    out = [Policy(fixed_policy_name(e), FIXED, {c: float(e) for c in chip_ids}) for e in fixed]
    for name, plan in reduce_plans.items():
        by_chip = dict(zip(plan["chip_id"], plan["planned_epochs"].astype(float)))
        out.append(Policy(name, REDUCE, {c: by_chip.get(c, math.nan) for c in chip_ids}))
    out.append(Policy("oracle", ORACLE, {}))
    return out


class ChipRun:
    """One chip's FAT run, measured (val and test) lazily on a grid of amounts: asking for an
    amount trains on to it, measuring every grid amount on the way, so later questions about
    smaller amounts are answered from what was measured."""

    def __init__(self, session: FatSession, grid: Sequence[float]) -> None:
        self.session = session
        self.grid = sorted(set(round(a, 9) for a in grid))
        self.measured: dict[float, dict[str, float]] = {}

    def _at(self, amount: float) -> dict[str, float]:
        amount = round(amount, 9)
        if amount not in self.grid:
            raise ValueError(f"amount {amount:g} is not on the comparison grid")
        for a in self.grid:
            if a > amount:
                break
            if a not in self.measured:
                self.session.advance(a)
                self.measured[a] = self.session.accuracies(("val", "test"))
        return self.measured[amount]

    def val(self, amount: float) -> float:
        return self._at(amount)[VAL_ACCURACY]

    def test(self, amount: float) -> float:
        return self._at(amount)[TEST_ACCURACY]


def comparison_grid(policy_list: Sequence[Policy], chip_id: str, rule: Rule) -> list[float]:
    """Every amount a policy may ask about for this chip: each fixed amount, the verification
    checks from the planned amount, and the oracle's steps up to the cap."""
    amounts = set(check_amounts(0.0, rule.step, rule.cap))
    for p in policy_list:
        e = p.epochs.get(chip_id, math.nan)
        if p.kind == FIXED:
            amounts.add(e)
        elif p.kind == REDUCE and not math.isnan(e):
            amounts.update(check_amounts(e, rule.step, rule.cap))
    return sorted(amounts)


def outcome(policy: Policy, fmap: FaultMap, run: ChipRun, rule: Rule) -> tuple:
    """One per-chip row (PER_CHIP_COLUMNS) of `policy` on this chip's run."""
    planned = policy.epochs.get(fmap.chip_id, math.nan)
    head = (policy.name, fmap.chip_id, fmap.fault_rate, planned)
    if policy.kind == ORACLE:       # the cheapest step at which the chip meets the test level
        for a in check_amounts(0.0, rule.step, rule.cap):
            if run.test(a) >= rule.constraint_level:
                return (*head, a, True, run.val(a), run.test(a), True, True, "")
        return (*head, 0.0, False, math.nan, math.nan, False, False, "never meets on test")
    if math.isnan(planned):         # the plan rejected the chip: no training, not shipped
        return (*head, 0.0, False, math.nan, math.nan, False, False, "plan")
    if policy.kind == FIXED:
        passed = run.val(planned) >= rule.decision_level + rule.margin
        epochs, why = planned, "" if passed else "validation"
    else:
        check = verify(run.val, planned, rule.decision_level, rule.margin, rule.step, rule.cap)
        passed, epochs, why = check.passed, check.epochs, "" if check.passed else "cap"
    test = run.test(epochs)
    meets = bool(test >= rule.constraint_level)
    return (*head, epochs, passed, run.val(epochs), test, passed and meets, meets, why)


def run_chips(baseline: nn.Module, data: Any, fleet: Sequence[FaultMap],
              policy_list: Sequence[Policy], rule: Rule, fat: FatConfig,
              hardware: HardwareConfig, device: torch.device | str = "cpu",
              progress: Progress | None = None) -> pd.DataFrame:
    """Every policy on every chip, from one FAT run per chip: the per-chip table."""
    rows = []
    for fmap in fleet:
        if progress is not None:
            progress.start(f"chip {fmap.chip_id}")
        session = FatSession.from_baseline(baseline, fmap, hardware.layer_types, data, fat,
                                           device)
        run = ChipRun(session, comparison_grid(policy_list, fmap.chip_id, rule))
        rows += [outcome(p, fmap, run, rule) for p in policy_list]
        if progress is not None:
            progress.done(f"chip {fmap.chip_id}", f"fault rate {fmap.fault_rate:.3f}, trained to "
                          f"{session.amount:.2f} epochs")
    return pd.DataFrame(rows, columns=PER_CHIP_COLUMNS)


def summarize(per_chip: pd.DataFrame, policy_list: Sequence[Policy]) -> pd.DataFrame:
    """Per policy: chips shipped, shipped chips that meet the constraint on test, total epochs,
    and the epochs relative to the cheapest fixed policy that ships at least as many chips."""
    rows = []
    for p in policy_list:
        g = per_chip[per_chip["policy"] == p.name]
        shipped, meets = int(g["shipped"].sum()), int(g["meets_on_test"].sum())
        total = float(g["epochs"].sum())
        rows.append([p.name, len(g), shipped, meets, meets / shipped if shipped else math.nan,
                     int(g["meets_unchecked"].sum()), total,
                     total / shipped if shipped else math.nan])
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS[:8])
    fixed = out[out["policy"].isin([p.name for p in policy_list if p.kind == FIXED])]
    cheapest, ratios = [], []
    for row in out.itertuples(index=False):
        enough = fixed[fixed["n_shipped"] >= row.n_shipped].sort_values("total_epochs")
        if enough.empty:
            cheapest.append("")
            ratios.append(math.nan)
        else:
            cheapest.append(enough["policy"].iloc[0])
            ratios.append(row.total_epochs / enough["total_epochs"].iloc[0]
                          if enough["total_epochs"].iloc[0] > 0 else math.nan)
    out["cheapest_fixed_as_many"] = cheapest
    out["epochs_ratio_to_it"] = np.asarray(ratios, dtype=float)
    return out[SUMMARY_COLUMNS]

"""Policies compared on one fleet (the paper's Fig. 3): fixed epochs, the verified Reduce plan and
a per-chip oracle, all read off ONE fault-aware training run per chip.

A chip's accuracy after E epochs is the same whichever policy asked for E (same baseline, fault
map, seed and batch order), so each chip is fine-tuned once, measured on the split some policy
asks for at the amounts it asks for, and every policy's outcome is read off that run.
Every policy ships a chip only when its model passes the same check on the validation split
(accuracy >= decision level + margin); the test split only says whether a shipped chip meets
the constraint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from reduce_ops import execution
from reduce_ops.batched import batch_size, chunks
from reduce_ops.config import ExecutionConfig, FatConfig, HardwareConfig
from reduce_ops.curves import ChipCurve, Recorded, record, record_batched
from reduce_ops.fault_aware import FatSession
from reduce_ops.grouping import member_share
from reduce_ops.hardware import FaultMap
from reduce_ops.progress import Progress
from reduce_ops.records.groups import FusedGroup
from reduce_ops.shipping import Measurement, ShippingRule, check_amounts, verification
from reduce_ops.yields import floor_report


class ChipRow(NamedTuple):
    """One policy on one chip: a row of per_chip.csv."""

    policy: str
    chip_id: str
    fault_rate: float
    planned_epochs: float      # what the policy planned (NaN: the oracle, or rejected up front)
    epochs: float              # what it trained (its share, for an eFAT group's member)
    shipped: bool
    val_accuracy: float
    test_accuracy: float
    meets_on_test: bool        # shipped and meeting the constraint on test
    meets_unchecked: bool      # meeting it on test whether shipped or not
    rejected_by: str           # "" (shipped) | validation | plan | cap | never meets on test


PER_CHIP_COLUMNS = list(ChipRow._fields)
# n_meet_unchecked: trained chips at or above the test level whether shipped or not (what a
# policy that shipped without any check would count; only the test split knows it)
# a test floor's figures against the chips recoverable at the cap (see reduce_ops.yields)
FLOOR_COLUMNS = ["n_recoverable", "yield", "yield_low", "yield_high", "n_overkill",
                 "overkill_rate", "n_escapes", "escape_rate", "escape_low", "escape_high"]
SUMMARY_COLUMNS = ["policy", "n_chips", "n_shipped", "n_meet_on_test", "meet_rate",
                   "n_meet_unchecked", "total_epochs", "epochs_per_shipped",
                   *FLOOR_COLUMNS, "cheapest_fixed_as_many", "epochs_ratio_to_it"]
FIXED, UNCHECKED, REDUCE, ORACLE = "fixed", "unchecked", "reduce", "oracle"
EFAT = "efat"


@dataclass(frozen=True)
class Policy:
    """How many epochs a policy gives each chip: `epochs` for a fixed policy (with the check,
    or shipping every chip unchecked), the plan's amounts for Reduce (NaN = rejected by the
    plan); the oracle picks its own. `rule`: the policy's own shipping rule (a reference kept
    beside the default), else the comparison's."""

    name: str
    kind: str
    epochs: dict[str, float]
    rule: ShippingRule | None = None


def fixed_policy_name(epochs: float, checked: bool = True) -> str:
    return f"fixed-{epochs:g}" if checked else f"fixed-{epochs:g}-unchecked"


def policies(fixed: Sequence[float], reduce_plans: dict[str, dict[str, float]],
             chip_ids: Sequence[str], cap: float,
             rules: dict[str, ShippingRule] | None = None) -> list[Policy]:
    """Fixed policies with the check, the same amounts shipped unchecked, the cap unchecked
    (which tells the recoverable chips), one verified Reduce policy per plan ({name: planned
    epochs by chip, NaN for a chip the plan rejects}, checked with `rules[name]` where given),
    and the oracle."""
    out = [Policy(fixed_policy_name(e), FIXED, {c: float(e) for c in chip_ids}) for e in fixed]
    out += [Policy(fixed_policy_name(e, False), UNCHECKED, {c: float(e) for c in chip_ids})
            for e in dict.fromkeys([*fixed, cap])]
    for name, by_chip in reduce_plans.items():
        out.append(Policy(name, REDUCE, {c: float(by_chip.get(c, math.nan)) for c in chip_ids},
                          (rules or {}).get(name)))
    out.append(Policy("oracle", ORACLE, {}))
    return out


def recoverable_policy(cap: float) -> str:
    """The policy whose per-chip verdicts say which chips are recoverable: the cap, no check."""
    return fixed_policy_name(cap, False)


# A policy on one chip is a generator: it yields the (amount, split) it wants measured next,
# in ascending amounts, is sent the Measurement there, and returns its per-chip row. One FAT run
# serves every policy: it trains up to the smallest amount any policy waits for, measures only
# the splits asked for there, and goes on.
Request = tuple[float, str]


def _fixed(policy: Policy, fmap: FaultMap, rule: ShippingRule
           ) -> Generator[Request, Measurement, ChipRow]:
    epochs = policy.epochs[fmap.chip_id]
    before = []
    if policy.kind == FIXED:           # the same check as Reduce's, pooled as it pools
        for k in range(rule.pool - 1, 0, -1):
            if epochs - k * rule.step >= -1e-9:
                before.append((yield (round(epochs - k * rule.step, 9), "val")))
    val = yield (epochs, "val")
    test = (yield (epochs, "test")).accuracy
    passed = policy.kind == UNCHECKED or rule.passes(val, before)
    meets = rule.meets(test)
    return ChipRow(policy.name, fmap.chip_id, fmap.fault_rate, epochs, epochs, passed,
                   val.accuracy, test, passed and meets, meets, "" if passed else "validation")


def _reduce(policy: Policy, fmap: FaultMap, rule: ShippingRule
            ) -> Generator[Request, Measurement, ChipRow]:
    planned = policy.epochs[fmap.chip_id]
    head = (policy.name, fmap.chip_id, fmap.fault_rate, planned)
    if math.isnan(planned):         # the plan rejected the chip: no training, not shipped
        return ChipRow(*head, 0.0, False, math.nan, math.nan, False, False, "plan")
    steps = verification(planned, rule)
    try:
        amount = next(steps)
        while True:
            amount = steps.send((yield (amount, "val")))
    except StopIteration as done:
        check = done.value
    test = (yield (check.epochs, "test")).accuracy
    meets = rule.meets(test)
    return ChipRow(*head, check.epochs, check.passed, check.val_accuracy, test,
                   check.passed and meets, meets, "" if check.passed else "cap")


def _oracle(policy: Policy, fmap: FaultMap, rule: ShippingRule
            ) -> Generator[Request, Measurement, ChipRow]:
    """The cheapest step at which the chip meets the test level: a lower bound that only the
    test split's answer makes possible."""
    head = (policy.name, fmap.chip_id, fmap.fault_rate, math.nan)
    for amount in check_amounts(0.0, rule.step, rule.cap):
        test = (yield (amount, "test")).accuracy
        if rule.meets(test):
            val = (yield (amount, "val")).accuracy
            return ChipRow(*head, amount, True, val, test, True, True, "")
    return ChipRow(*head, 0.0, False, math.nan, math.nan, False, False, "never meets on test")


POLICY_KINDS = {FIXED: _fixed, UNCHECKED: _fixed, REDUCE: _reduce, ORACLE: _oracle}


def run_policies(session: FatSession, policy_list: Sequence[Policy], fmap: FaultMap,
                 rule: ShippingRule) -> list[ChipRow]:
    """Every policy's row for one chip from ONE FAT session (see Request above)."""
    rows: dict[int, ChipRow] = {}
    pending: dict[int, tuple[Generator, Request]] = {}
    for i, policy in enumerate(policy_list):
        gen = POLICY_KINDS[policy.kind](policy, fmap, policy.rule or rule)
        try:
            pending[i] = (gen, next(gen))
        except StopIteration as done:
            rows[i] = done.value
    measured: dict[Request, Measurement] = {}
    while pending:
        amount = min(round(req[0], 9) for _, req in pending.values())
        session.advance(amount)
        for i, (gen, (at, split)) in list(pending.items()):
            if round(at, 9) != amount:
                continue
            key = (amount, split)
            if key not in measured:
                measured[key] = session.measure((split,))[split]
            try:
                pending[i] = (gen, gen.send(measured[key]))
            except StopIteration as done:
                rows[i] = done.value
                del pending[i]
    return [rows[i] for i in range(len(policy_list))]


@dataclass(frozen=True)
class _ChipInputs:
    """What a worker needs to run every policy on a chip (sent to Ray's object store once)."""

    baseline: nn.Module
    data: Any
    policy_list: Sequence[Policy]
    rule: ShippingRule
    fat: FatConfig
    layer_types: Sequence[str]
    device: Any
    stuck: dict[str, Any]
    amounts: tuple[float, ...]


def _chip_task(shared: _ChipInputs, fmap: FaultMap) -> tuple[list[ChipRow], ChipCurve]:
    """One chip's curve (one FAT session measured at every amount) and every policy's row."""
    t0 = time.perf_counter()
    session = FatSession.from_baseline(shared.baseline, fmap, shared.layer_types, shared.data,
                                       shared.fat, shared.device, shared.stuck.get(fmap.chip_id))
    curve = record(session, fmap, shared.amounts)
    curve.seconds = time.perf_counter() - t0
    return run_policies(Recorded(curve), shared.policy_list, fmap, shared.rule), curve


def _chips_task(shared: _ChipInputs, fmaps: tuple[FaultMap, ...]
                ) -> list[tuple[list[ChipRow], ChipCurve]]:
    """Several chips' curves trained as one computation, and every policy's rows per chip."""
    return [(run_policies(Recorded(curve), shared.policy_list, fmap, shared.rule), curve)
            for fmap, curve in zip(fmaps, record_batched(
                shared.baseline, fmaps, shared.layer_types, shared.data, shared.fat,
                shared.device, shared.amounts))]


def run_chips(baseline: nn.Module, data: Any, fleet: Sequence[FaultMap],
              policy_list: Sequence[Policy], rule: ShippingRule, fat: FatConfig,
              hardware: HardwareConfig, amounts: Sequence[float],
              device: torch.device | str = "cpu", progress: Progress | None = None,
              stuck: dict[str, Any] | None = None,
              exe: ExecutionConfig | None = None) -> tuple[pd.DataFrame, list[ChipCurve]]:
    """Every policy on every chip, from one FAT run per chip measured at `amounts` (through
    its stuck bits, for a stuck-at fleet), the chips on `exe`'s workers: the per-chip table
    and the curves, in fleet order."""
    shared = _ChipInputs(baseline, data, tuple(policy_list), rule, fat,
                         tuple(hardware.layer_types), device, stuck or {}, tuple(amounts))
    rows: dict[int, list[ChipRow]] = {}
    curves: dict[int, ChipCurve] = {}

    def finished(i: int, result: tuple[list[ChipRow], ChipCurve]) -> None:
        rows[i], curves[i] = result
        if progress is not None:
            progress.done(f"chip {fleet[i].chip_id}", f"fault rate {fleet[i].fault_rate:.3f}, "
                          f"trained to {curves[i].amounts[-1]:.2f} epochs", curves[i].seconds)

    exe = exe or execution.LOCAL
    size = batch_size(exe.batch, baseline, bool(stuck), data.x["train"][:4], device)
    if size > 1:               # every chip trains to the same amounts with the same batches
        groups = chunks([0] * len(fleet), size, execution.parallel(exe))
        execution.map_unordered(
            _chips_task, shared, [tuple(fleet[i] for i in g) for g in groups], exe,
            lambda j, results: [finished(i, r) for i, r in zip(groups[j], results)])
    else:
        execution.map_unordered(_chip_task, shared, list(fleet), exe, finished)
    return (pd.DataFrame([r for i in range(len(fleet)) for r in rows[i]],
                         columns=PER_CHIP_COLUMNS), [curves[i] for i in range(len(fleet))])


def _group_task(shared: _ChipInputs, grp: FusedGroup) -> ChipRow:
    """A group's one FAT run on its fused map, verified like a chip: its eFAT row."""
    session = FatSession.from_baseline(shared.baseline, grp.fault_map, shared.layer_types,
                                       shared.data, shared.fat, shared.device)
    policy = Policy(EFAT, REDUCE, {grp.group_id: grp.planned_epochs})
    (row,) = run_policies(session, [policy], grp.fault_map, shared.rule)
    return row


def efat_rows(per_chip: pd.DataFrame, groups: Sequence[FusedGroup], fallback: str,
              rule: ShippingRule, baseline: nn.Module, data: Any, fat: FatConfig,
              hardware: HardwareConfig, device: torch.device | str = "cpu",
              progress: Progress | None = None,
              exe: ExecutionConfig | None = None) -> pd.DataFrame:
    """The eFAT policy: each group of two or more trains ONE model on its fused map, verified
    like a chip (on `exe`'s workers); its epochs are shared by its members. A chip on its own,
    and every member of a group that misses at the cap (which then trains alone, after the
    group's epochs were spent), is what the `fallback` Reduce policy does with it."""
    own = per_chip[per_chip["policy"] == fallback].set_index("chip_id")
    multi = [g for g in groups if g.shared]
    shared = _ChipInputs(baseline, data, (), rule, fat, tuple(hardware.layer_types), device, {},
                         ())
    results: dict[int, ChipRow] = {}

    def finished(i: int, row: ChipRow) -> None:
        results[i] = row
        if progress is not None:
            grp = multi[i]
            progress.done(f"group {grp.group_id}", f"{len(grp.members)} chips, fused fault rate "
                          f"{grp.fault_map.fault_rate:.3f}, "
                          f"{'shipped' if row.shipped else 'missed'} after {row.epochs:g} epochs")

    execution.map_unordered(_group_task, shared, multi, exe or execution.LOCAL, finished)
    rows = []
    grouped = set()
    for i, grp in enumerate(multi):
        run = results[i]
        share = member_share(run.epochs, len(grp.members))
        for m in grp.members:
            grouped.add(m.chip_id)
            if run.shipped:
                rows.append(ChipRow(EFAT, m.chip_id, m.fault_rate, grp.planned_epochs, share,
                                    True, run.val_accuracy, run.test_accuracy,
                                    run.meets_unchecked, run.meets_unchecked, ""))
            else:
                alone = ChipRow(EFAT, m.chip_id, *own.loc[m.chip_id, PER_CHIP_COLUMNS[2:]])
                rows.append(alone._replace(epochs=alone.epochs + share))
    for chip_id, alone in own.iterrows():
        if chip_id not in grouped:
            rows.append(ChipRow(EFAT, chip_id, *alone[PER_CHIP_COLUMNS[2:]].tolist()))
    return pd.DataFrame(rows, columns=PER_CHIP_COLUMNS)


def summarize(per_chip: pd.DataFrame, policy_list: Sequence[Policy], cap: float) -> pd.DataFrame:
    """Per policy: chips shipped, shipped chips that meet the constraint on test, total epochs,
    the epochs relative to the cheapest fixed policy (with the check) that ships at least as
    many chips, and a test floor's figures against the chips recoverable at the cap (yield,
    overkill, escapes, with Wilson intervals)."""
    recoverable = per_chip[per_chip["policy"] == recoverable_policy(cap)].set_index(
        "chip_id")["meets_unchecked"].astype(bool)
    rows = []
    for p in policy_list:
        g = per_chip[per_chip["policy"] == p.name]
        shipped, meets = int(g["shipped"].sum()), int(g["meets_on_test"].sum())
        total = float(g["epochs"].sum())
        floor = floor_report(g["shipped"].astype(bool), g["meets_on_test"].astype(bool),
                             recoverable.reindex(g["chip_id"]).fillna(False).astype(bool))
        rows.append([p.name, len(g), shipped, meets, meets / shipped if shipped else math.nan,
                     int(g["meets_unchecked"].sum()), total,
                     total / shipped if shipped else math.nan,
                     *(getattr(floor, "yield_" if k == "yield" else k) for k in FLOOR_COLUMNS)])
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS[:8] + FLOOR_COLUMNS)
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

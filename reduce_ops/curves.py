"""A chip's one FAT run measured on both splits at every amount any policy may ask for: what
`compare` reads every policy's outcome off (and the operating-characteristic figure after it)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reduce_ops.batched import BatchedFat
from reduce_ops.config import FatConfig
from reduce_ops.fault_aware import FatSession
from reduce_ops.hardware import FaultMap
from reduce_ops.shipping import Measurement, check_amounts


@dataclass
class ChipCurve:
    """One FAT run measured on both splits at every amount any policy may ask for."""

    chip_id: str
    fault_rate: float
    amounts: list[float] = field(default_factory=list)
    val: list[Measurement] = field(default_factory=list)
    test: list[Measurement] = field(default_factory=list)
    seconds: float = field(default=0.0, compare=False)   # FAP + FAT + evaluation wall time

    def add(self, amount: float, measured: dict[str, Measurement]) -> None:
        """Both splits' measurements at `amount`, the next amount of the run."""
        self.amounts.append(amount)
        self.val.append(measured["val"])
        self.test.append(measured["test"])

    def rows(self) -> list[tuple]:
        return [(self.chip_id, self.fault_rate, a, v.accuracy, v.lost, v.gained, t.accuracy,
                 t.lost, t.gained) for a, v, t in zip(self.amounts, self.val, self.test)]


CURVE_COLUMNS = ["chip_id", "fault_rate", "amount", "val_accuracy", "val_lost", "val_gained",
                 "test_accuracy", "test_lost", "test_gained"]


def curve_amounts(fixed: Sequence[float], step: float, cap: float, granularity: float,
                  pool: int = 1) -> list[float]:
    """Every amount a policy may ask for: the fixed amounts, and the checks of any plan (whose
    amounts are multiples of `granularity`) every `step` up to the cap, with the `pool` - 1
    amounts a step apart before each that a pooling check reads."""
    starts = [round(k * granularity, 9) for k in range(int(math.floor(cap / granularity
                                                                       + 1e-9)) + 1)]
    starts += [round(float(e), 9) for e in fixed if e <= cap + 1e-9]
    amounts: set[float] = set()
    for start in starts:
        amounts.update(check_amounts(start, step, cap))
        amounts.update(round(start - k * step, 9) for k in range(1, pool)
                       if start - k * step >= -1e-9)
    return sorted(max(a, 0.0) for a in amounts)


def record(session: FatSession, fmap: FaultMap, amounts: Sequence[float]) -> ChipCurve:
    """Train `session` through `amounts`, measuring both splits at each."""
    curve = ChipCurve(fmap.chip_id, fmap.fault_rate)
    for amount in amounts:
        session.advance(amount)
        curve.add(amount, session.measure(("val", "test")))
    return curve


class Recorded:
    """A recorded ChipCurve in place of a FAT session: `run_policies` advances it and measures,
    and gets what the one run measured at that amount."""

    def __init__(self, curve: ChipCurve) -> None:
        self.curve, self.amount = curve, 0.0
        self._at = {round(a, 9): i for i, a in enumerate(curve.amounts)}

    def advance(self, amount: float) -> None:
        self.amount = amount

    def measure(self, splits: Sequence[str]) -> dict[str, Measurement]:
        i = self._at.get(round(self.amount, 9))
        if i is None:
            raise ValueError(f"chip {self.curve.chip_id}: {self.amount:g} epochs not recorded")
        return {s: getattr(self.curve, s)[i] for s in splits}


def record_batched(baseline: nn.Module, fmaps: Sequence[FaultMap], layer_types: Sequence[str],
                   data: Any, fat: FatConfig, device: torch.device | str,
                   amounts: Sequence[float]) -> list[ChipCurve]:
    """`record` for several chips trained as one computation (reduce_ops.batched): the same
    curves within float rounding; each curve's seconds its share of the whole."""
    t0 = time.perf_counter()
    run = BatchedFat.from_baseline(baseline, fmaps, layer_types, data, fat, device)
    curves = [ChipCurve(f.chip_id, f.fault_rate) for f in fmaps]
    for amount in amounts:
        run.advance(amount)
        for curve, m in zip(curves, run.measure(("val", "test"))):
            curve.add(amount, m)
    for curve in curves:
        curve.seconds = (time.perf_counter() - t0) / len(fmaps)
    return curves

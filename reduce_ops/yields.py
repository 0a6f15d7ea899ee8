"""A test floor's figures for a shipping decision: of the chips that retraining can recover, how
many ship and meet the constraint (yield), how many are scrapped anyway (overkill), and how many
shipped chips miss it (escapes), each with its Wilson interval.

A chip is *recoverable* when its model after `plan.budget_cap` epochs of FAT (one measurement
at the cap, no check) meets the constraint on the report split. Yield counts the shipped chips
that meet the constraint against the recoverable ones (a chip that met at the amount it shipped
with but not at the cap counts too, so yield can exceed 1 by a chip or two).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from reduce_ops.binomial import wilson_interval


@dataclass(frozen=True)
class FloorReport:
    """Shipped, recoverable, yield, overkill and escapes of one policy on one fleet."""

    n_chips: int
    n_recoverable: int
    n_shipped: int
    n_shipped_meeting: int
    n_escapes: int             # shipped but missing the constraint on the report split
    n_overkill: int            # recoverable but not shipped
    yield_: float              # n_shipped_meeting / n_recoverable
    yield_low: float
    yield_high: float
    escape_rate: float         # n_escapes / n_shipped
    escape_low: float
    escape_high: float
    overkill_rate: float       # n_overkill / n_recoverable

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k.rstrip('_')}": v for k, v in asdict(self).items()}


def _rate(k: int, n: int) -> tuple[float, float, float]:
    if n <= 0:
        return math.nan, math.nan, math.nan
    p = k / n
    lo, hi = wilson_interval(min(p, 1.0), n)
    return p, lo, hi


def floor_report(shipped: Sequence[bool], meets: Sequence[bool],
                 recoverable: Sequence[bool]) -> FloorReport:
    """Per chip: shipped by the policy, meeting the constraint on the report split with the
    model it shipped with (any value where not shipped), recoverable."""
    s = np.asarray(shipped, dtype=bool)
    m = np.asarray(meets, dtype=bool)
    r = np.asarray(recoverable, dtype=bool)
    if not s.shape == m.shape == r.shape:
        raise ValueError(f"floor_report: {s.size} shipped, {m.size} meets, {r.size} recoverable")
    good, escapes, overkill = int((s & m).sum()), int((s & ~m).sum()), int((r & ~s).sum())
    y, y_lo, y_hi = _rate(good, int(r.sum()))
    e, e_lo, e_hi = _rate(escapes, int(s.sum()))
    return FloorReport(int(s.size), int(r.sum()), int(s.sum()), good, escapes, overkill,
                       y, y_lo, y_hi, e, e_lo, e_hi,
                       overkill / int(r.sum()) if r.any() else math.nan)

"""The operating characteristic of a decision rule: yield against escape rate as its guard band
varies, read off the chips' recorded curves (each chip trained once, measured on both splits at
every amount a plan may ask for). Every point is a whole Reduce run: the plan made for that
rule from the logged trials, then each chip verified by it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reduce_ops.compare import PER_CHIP_COLUMNS, REDUCE, ChipCurve, Policy, Recorded, run_policies
from reduce_ops.hardware import FaultMap
from reduce_ops.planning import plan_for_rule
from reduce_ops.shipping import ShippingRule
from reduce_ops.yields import floor_report

OC_COLUMNS = ["family", "setting", "margin", "escape_rate_setting", "n_shipped", "n_recoverable",
              "yield", "escape_rate", "n_escapes", "n_overkill", "total_epochs", "is_default"]
MARGINS = tuple(round(x, 4) for x in np.arange(-0.01, 0.02001, 0.0025))     # flat guard bands
ESCAPE_RATES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45)


@dataclass(frozen=True)
class PlanSettings:
    """How a rule's plan is made (params' plan.* and resilience.checkpoint_every)."""

    statistic: str
    granularity: float
    safety_margin: float
    min_reached: float
    fleet_budget: float | None = None


def run_rule(rule: ShippingRule, trials: pd.DataFrame, fleet: Sequence[FaultMap],
             curves: Sequence[ChipCurve], settings: PlanSettings) -> pd.DataFrame:
    """Reduce with `rule` on recorded curves: plan, verify; the per-chip rows (compare's)."""
    plan = plan_for_rule(trials, fleet, rule, settings.statistic, settings.granularity,
                         settings.safety_margin, settings.min_reached,
                         settings.fleet_budget).plan
    policy = Policy("rule", REDUCE, dict(zip(plan["chip_id"],
                                             plan["planned_epochs"].astype(float))), rule)
    rows = [row for fmap, curve in zip(fleet, curves)
            for row in run_policies(Recorded(curve), [policy], fmap, rule)]
    return pd.DataFrame(rows, columns=PER_CHIP_COLUMNS)


def recoverable(curves: Sequence[ChipCurve], rule: ShippingRule) -> np.ndarray:
    """Per chip: its model at the cap meets the constraint on the report split."""
    out = []
    for c in curves:
        at = {round(a, 9): i for i, a in enumerate(c.amounts)}
        i = at.get(round(rule.cap, 9))
        out.append(i is not None and rule.meets(c.test[i].accuracy))
    return np.array(out, dtype=bool)


def operating_points(rule: ShippingRule, trials: pd.DataFrame, fleet: Sequence[FaultMap],
                     curves: Sequence[ChipCurve], settings: PlanSettings,
                     margins: Sequence[float] = MARGINS,
                     escape_rates: Sequence[float] = ESCAPE_RATES) -> pd.DataFrame:
    """Yield, escapes and epochs of the flat margin (no escape rate) at every margin, and of
    the statistical band at every escape rate (margin 0), beside the default rule's own."""
    rec = recoverable(curves, rule)
    variants = [("flat margin, one check", f"{m * 100:+.2f} point", dataclasses.replace(
        rule, margin=float(m), escape_rate=0.0, pool=1)) for m in margins]
    variants += [("band from escape_rate, one check", f"{e:g}", dataclasses.replace(
        rule, margin=0.0, escape_rate=float(e), pool=1)) for e in escape_rates]
    variants += [(f"band from escape_rate, pooled over {max(rule.pool, 2)} checks", f"{e:g}",
                  dataclasses.replace(rule, margin=0.0, escape_rate=float(e),
                                      pool=max(rule.pool, 2))) for e in escape_rates]
    variants.append(("default", "params.yaml", rule))
    points = []
    for family, setting, r in variants:
        rows = run_rule(r, trials, fleet, curves, settings)
        floor = floor_report(rows["shipped"].astype(bool), rows["meets_on_test"].astype(bool),
                             rec)
        points.append((family, setting, r.margin, r.escape_rate, floor.n_shipped,
                       floor.n_recoverable, floor.yield_, floor.escape_rate, floor.n_escapes,
                       floor.n_overkill, float(rows["epochs"].sum()), family == "default"))
    return pd.DataFrame(points, columns=OC_COLUMNS)

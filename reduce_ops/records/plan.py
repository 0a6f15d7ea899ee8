"""The plan record that `plan` hands `group`, `fat` and `compare`: every chip's planned epochs (or
infeasible, with the reason), the per-rate curve points it was read off, and a summary holding
the shipping rule it was planned for and which resilience run, baseline and data it comes from."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reduce_ops import atomic, names, provenance
from reduce_ops.config import Config
from reduce_ops.errors import DataError, ReduceOpsError, TrackingError
from reduce_ops.hardware import FaultMap
from reduce_ops.records import sets
from reduce_ops.shipping import ShippingRule
from reduce_ops.tracking.runs import get_run
from reduce_ops.tracking.store import tracking_uri

PLAN_COLUMNS = ["chip_id", "fault_rate", "needed", "planned_epochs", "feasible", "reason"]
PLAN_FILE, POINTS_FILE, SUMMARY_FILE, FIGURE_FILE = ("plan.csv", "curve_points.csv",
                                                     "summary.json", "plan_curve.png")
_FILES = (PLAN_FILE, POINTS_FILE, SUMMARY_FILE, FIGURE_FILE)
RATE_TOL = 1e-9             # plan vs fleet fault rates: the same float, up to repr
# the rule's fields as the summary spells them (the names every earlier summary used)
_RULE_KEYS = {"decision_level": "decision_level", "constraint_level": "constraint_level",
              "margin": "verify_margin", "step": "verify_step", "cap": "budget_cap",
              "escape_rate": "verify_escape_rate", "paired": "paired_decision",
              "n_decision": "n_decision", "n_report": "n_report", "pool": "verify_pool"}


def rule_from_summary(d: dict[str, Any], where: str) -> ShippingRule:
    """The shipping rule a plan's summary.json records."""
    return ShippingRule.from_dict({f: d[k] for f, k in _RULE_KEYS.items() if k in d}, where)


def directory(results: Path) -> Path:
    """Where the plan stage writes its record under paths.results."""
    return results / "plan"


@dataclass(frozen=True)
class PlanSummary:
    """What every reader of a plan needs besides its rows."""

    run_id: str                # the plan stage's MLflow run
    resilience_run_id: str     # the trials it was read off
    rule: ShippingRule         # what a chip must show to ship, and what judges it
    statistic: str
    baseline_hash: str
    dataset_hash: str
    extra: dict[str, Any]      # counts and totals, reported as they were written

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "resilience_run_id": self.resilience_run_id,
                **{key: getattr(self.rule, f) for f, key in _RULE_KEYS.items()},
                "statistic": self.statistic, "baseline_hash": self.baseline_hash,
                "dataset_hash": self.dataset_hash, **self.extra}


@dataclass(frozen=True)
class Plan:
    """A read plan: one row per chip (PLAN_COLUMNS, `feasible` as bool), the curve points, the
    summary."""

    chips: pd.DataFrame
    points: pd.DataFrame
    summary: PlanSummary

    @property
    def run_id(self) -> str:
        return self.summary.run_id

    @property
    def rule(self) -> ShippingRule:
        return self.summary.rule


def write(out_dir: Path, chips: pd.DataFrame, points: pd.DataFrame, summary: PlanSummary,
          draw: Any = None) -> dict[str, Any]:
    """plan.csv, curve_points.csv, the figure (`draw(path)`, optional) and summary.json (with
    the other files' sha256), all of them replacing the old plan at once: an interrupted
    write leaves the old plan whole. Returns the summary as written."""
    missing = [c for c in PLAN_COLUMNS if c not in chips.columns]
    if missing:
        raise ValueError(f"plan rows lack {missing}")
    with sets.record_dir(out_dir, "plan", *_FILES) as tmp:
        atomic.write_csv(chips[PLAN_COLUMNS], tmp / PLAN_FILE)
        atomic.write_csv(points, tmp / POINTS_FILE)
        if draw is not None:
            draw(tmp / FIGURE_FILE)
        written = {**summary.to_dict(),
                   sets.FILES_KEY: sets.digests(tmp, PLAN_FILE, POINTS_FILE, FIGURE_FILE)}
        atomic.write_json(tmp / SUMMARY_FILE, written)
    return written


def read(plan_dir: Path) -> Plan:
    """The plan in `plan_dir`, checked; one clear line when it is missing or broken."""
    paths = [plan_dir / name for name in (PLAN_FILE, POINTS_FILE, SUMMARY_FILE)]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: no plan; run `reduce-ops plan` first")
    csv_path, points_path, summary_path = paths
    try:
        chips = pd.read_csv(csv_path, dtype={"chip_id": str, "reason": str},
                            keep_default_na=False, na_values=[""])
        points = pd.read_csv(points_path)
        d = json.loads(summary_path.read_text())
        sets.check(plan_dir, d, SUMMARY_FILE, "plan")
        summary = PlanSummary(str(d["run_id"]), str(d.get("resilience_run_id", "")),
                              rule_from_summary(d, str(summary_path)),
                              str(d.get("statistic", "")), str(d.get("baseline_hash", "")),
                              str(d.get("dataset_hash", "")),
                              {k: v for k, v in d.items() if k not in _SUMMARY_FIELDS})
    except (ValueError, KeyError, TypeError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{plan_dir}: unreadable plan ({type(exc).__name__}: {exc}); run "
                        f"`reduce-ops plan` again") from None
    missing = [c for c in PLAN_COLUMNS if c not in chips.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}")
    chips["feasible"] = chips["feasible"].astype(str).str.lower().isin(("true", "1"))
    bad = chips["feasible"] & ~np.isfinite(chips["planned_epochs"].astype(float))
    if bad.any():
        raise DataError(f"{csv_path}: feasible chip {chips.loc[bad, 'chip_id'].iloc[0]!r} "
                        f"has no planned_epochs")
    return Plan(chips, points, summary)


_SUMMARY_FIELDS = {"run_id", "resilience_run_id", "statistic", "baseline_hash", "dataset_hash",
                   sets.FILES_KEY, *_RULE_KEYS.values()}


@dataclass(frozen=True)
class PlannedChip:
    """One chip's plan row joined with its fault map."""

    chip_id: str
    fault_rate: float
    planned_epochs: float      # NaN when infeasible
    feasible: bool
    reason: str
    fault_map: FaultMap


def for_fleet(plan: Plan, fleet: Sequence[FaultMap], where: Path) -> list[PlannedChip]:
    """The plan's rows joined with the fleet's maps, in plan order; a plan that does not match
    the fleet (other chips, or another fault rate) is stale: one line naming `where`."""
    maps = {m.chip_id: m for m in fleet}
    planned = set(plan.chips["chip_id"])
    if planned != set(maps):
        extra = sorted(planned - set(maps))[:3]
        absent = sorted(set(maps) - planned)[:3]
        what = (f"chips not in the fleet: {', '.join(extra)}" if extra
                else f"fleet chips not planned: {', '.join(absent)}")
        raise DataError(f"{where}: the plan does not match the fleet ({what}); "
                        f"run `reduce-ops plan` again")
    out = []
    for row in plan.chips.itertuples(index=False):
        fault_map = maps[row.chip_id]
        if abs(fault_map.fault_rate - float(row.fault_rate)) > RATE_TOL:
            raise DataError(f"{where}: chip {row.chip_id!r} planned at fault rate "
                            f"{float(row.fault_rate):g}, its map has {fault_map.fault_rate:g}; "
                            f"run `reduce-ops plan` again")
        out.append(PlannedChip(row.chip_id, fault_map.fault_rate, float(row.planned_epochs),
                               bool(row.feasible),
                               "" if pd.isna(row.reason) else str(row.reason), fault_map))
    return out


def epochs_by_chip(plan: Plan) -> dict[str, float]:
    """{chip id: planned epochs}, NaN for a chip the plan rejects."""
    return {c: (float(e) if f else math.nan) for c, e, f in
            zip(plan.chips["chip_id"], plan.chips["planned_epochs"], plan.chips["feasible"])}


def _require_logged(plan: Plan, plan_dir: Path, uri: str) -> None:
    """The plan's run is in the store this project tracks to now: a plan made while
    MLFLOW_TRACKING_URI named another store (or whose run was deleted) would have its chips
    registered under a plan id that store has never seen."""
    try:
        run = get_run(uri, plan.run_id)
    except TrackingError:
        run = None
    if run is None or run.deleted or run.tags.get(names.TAG_STAGE) != "plan":
        why = ("is not in" if run is None else "was deleted in" if run.deleted
               else "is not a plan run in")
        raise TrackingError(f"the plan in {plan_dir}: its MLflow run {plan.run_id} {why} "
                            f"{uri} (made with another MLFLOW_TRACKING_URI?); run "
                            f"`reduce-ops plan` again")


def read_current(cfg: Config, check_rule: bool = True) -> Plan:
    """The plan record in results/plan, checked against the current baseline and dataset and
    (`check_rule`) made for the shipping rule params.yaml states now: verify.margin,
    verify.step and plan.budget_cap; and for the plan.min_reached and plan.fleet_budget that
    decide which chips it trains."""
    plan_dir = directory(cfg.path("results"))
    plan = read(plan_dir)
    remedy = "run `reduce-ops resilience` and `reduce-ops plan` again"
    provenance.Identity(plan.summary.baseline_hash, plan.summary.dataset_hash).require_match(
        provenance.current_identity(cfg), f"the plan in {plan_dir}", remedy)
    _require_logged(plan, plan_dir, tracking_uri(cfg.root))
    if check_rule:
        rule = plan.rule
        for key, planned, now in (("plan.budget_cap", rule.cap, cfg.plan.budget_cap),
                                  ("verify.margin", rule.margin, cfg.verify.margin),
                                  ("verify.step", rule.step, cfg.verify.step),
                                  ("verify.escape_rate", rule.escape_rate,
                                   cfg.verify.escape_rate or 0.0),
                                  ("verify.pool", rule.pool, cfg.verify.pool)):
            if planned != now:
                raise ReduceOpsError(f"the plan in {plan_dir} was made for {key} {planned:g} "
                                     f"(now {now:g}); {remedy}")
    # which chips the plan trains (plans of earlier versions recorded neither: not checked)
    for key, name, now in (("plan.min_reached", "min_reached", cfg.plan.min_reached),
                           ("plan.fleet_budget", "fleet_budget", cfg.plan.fleet_budget)):
        if name in plan.summary.extra and plan.summary.extra[name] != now:
            raise ReduceOpsError(f"the plan in {plan_dir} was made for {key} "
                                 f"{_shown(plan.summary.extra[name])} (now {_shown(now)}); "
                                 f"run `reduce-ops plan` again")
    return plan


def _shown(value: Any) -> str:
    return "null" if value is None else f"{value:g}"


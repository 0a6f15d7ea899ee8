"""`reduce-ops compare`: fixed-epoch policies (checked and unchecked), the verified Reduce plan
(and the earlier flat-margin rule as a reference), eFAT and a per-chip oracle on the fleet (the
paper's Fig. 3), from one FAT run per chip measured at every amount a policy may ask for; a test
floor's yield, overkill and escapes for each, and the operating characteristic of the rule."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import pandas as pd

from reduce_ops import atomic, compare, execution, names, provenance
from reduce_ops.config import Config, flatten
from reduce_ops.curves import CURVE_COLUMNS, curve_amounts
from reduce_ops.data import load_prepared
from reduce_ops.errors import ReduceOpsError
from reduce_ops.hardware import ArrayGeometry, FaultMap, load_fleet
from reduce_ops.hardware.stuckfleet import load_stuck
from reduce_ops.models import load_checkpoint
from reduce_ops.operating import PlanSettings, operating_points
from reduce_ops.planning import plan_for_rule
from reduce_ops.progress import Progress
from reduce_ops.records import groups as groups_record
from reduce_ops.records import plan as plan_record
from reduce_ops.records import trials as trials_record
from reduce_ops.reports.compare import (
    plot_operating_characteristic,
    plot_policy_comparison,
)
from reduce_ops.shipping import ShippingRule
from reduce_ops.tracking.runs import stage_run
from reduce_ops.tracking.store import tracking_uri
from reduce_ops.training import resolve_device

POLICY_METRICS = ("n_shipped", "n_meet_on_test", "meet_rate", "n_meet_unchecked", "total_epochs",
                  "epochs_per_shipped", "epochs_ratio_to_it", *compare.FLOOR_COLUMNS)


WITHIN_EDGE = "within-edge"   # suffix of the policy planned without plan.fleet_budget


def reference_name(cfg: Config) -> str:
    """The reference policy's name, e.g. reduce-mean-flat0.75pt: the earlier decision rule (a
    flat margin, one check, no band) on the same plan settings and constraint."""
    return f"reduce-{cfg.plan.statistic}-flat{cfg.compare.reference_margin * 100:g}pt"


def _reduce_plans(cfg: Config, plan: plan_record.Plan, trials: pd.DataFrame,
                  fleet: list[FaultMap]) -> tuple[dict[str, dict[str, float]],
                                                  dict[str, ShippingRule]]:
    """{policy name: planned epochs by chip} for every statistic compared (the plan record's
    own, the others planned the same way from the same logged trials), the plan without the
    fleet's spare budget (chips beyond the edge rejected untrained) and the flat-margin
    reference, with the reference's own rule."""
    if plan.summary.statistic != cfg.plan.statistic:
        raise ReduceOpsError(f"the plan in {plan_record.directory(cfg.path('results'))} was made "
                             f"for plan.statistic {plan.summary.statistic} (now "
                             f"{cfg.plan.statistic}); run `reduce-ops plan` again")
    settings = (cfg.resilience.checkpoint_every, cfg.plan.safety_margin, cfg.plan.min_reached)

    def by_chip(rule: ShippingRule, stat: str,
                budget: float | None = cfg.plan.fleet_budget) -> dict[str, float]:
        other = plan_for_rule(trials, fleet, rule, stat, *settings, budget).plan
        return dict(zip(other["chip_id"], other["planned_epochs"].astype(float)))

    plans = {f"reduce-{stat}": (plan_record.epochs_by_chip(plan)
                                if stat == plan.summary.statistic else by_chip(plan.rule, stat))
             for stat in dict.fromkeys([*cfg.compare.statistics, cfg.plan.statistic])}
    rules = {}
    if cfg.plan.fleet_budget is not None:      # the plan as it was before the budget: kept beside
        plans[f"reduce-{cfg.plan.statistic}-{WITHIN_EDGE}"] = by_chip(
            plan.rule, cfg.plan.statistic, None)
    if cfg.compare.reference_margin is not None:
        reference = dataclasses.replace(plan.rule, margin=cfg.compare.reference_margin,
                                        escape_rate=0.0, pool=1)
        # as it was before plan.fleet_budget: chips beyond the edge rejected untrained
        plans[reference_name(cfg)] = by_chip(reference, cfg.plan.statistic, None)
        rules[reference_name(cfg)] = reference
    return plans, rules


def run(cfg: Config) -> dict[str, Any]:
    """Write results/compare/ (per chip, curves, summary, metrics, Fig. 3, the operating
    characteristic); returns the metrics."""
    t0 = time.perf_counter()
    execution.check_address(cfg.execution)
    identity = provenance.current_identity(cfg)
    source = provenance.resilience_run(cfg, identity)     # trials measured for these params
    plan = plan_record.read_current(cfg)
    if plan.summary.resilience_run_id != source.run_id:
        raise ReduceOpsError(f"the plan in {plan_record.directory(cfg.path('results'))} was made "
                             f"from resilience run {plan.summary.resilience_run_id}, not "
                             f"{source.run_id}; run `reduce-ops plan` again")
    rule = plan.rule
    fleet = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    plan_record.for_fleet(plan, fleet, plan_record.directory(cfg.path("results"))
                          / plan_record.PLAN_FILE)                   # the plan fits the fleet
    trials = trials_record.read_logged(tracking_uri(cfg.root), source.run_id)
    chip_ids = [m.chip_id for m in fleet]
    plans, rules = _reduce_plans(cfg, plan, trials, fleet)
    policy_list = compare.policies(cfg.compare.fixed_epochs, plans, chip_ids, rule.cap, rules)
    amounts = curve_amounts(cfg.compare.fixed_epochs, rule.step, rule.cap,
                                    cfg.resilience.checkpoint_every, rule.pool)
    groups = (groups_record.read(groups_record.directory(cfg.path("results")), plan, fleet)
              if cfg.group.enabled else [])
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, _ = load_checkpoint(cfg.path("baseline"), device,
                                   cfg.hardware.exclude_layers)
    out_dir = cfg.path("results") / "compare"
    with stage_run(cfg.root, "compare", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg), children="policies") as stage:
        stage.set_tags({names.TAG_RESILIENCE_RUN: source.run_id,
                        **provenance.identity_tags(identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("compare", "plan", "verify",
                                                                   "constraint", "fat")}))
        stage.log_params({"resilience_run_id": source.run_id, "n_chips": len(chip_ids),
                          "execution.backend": cfg.execution.backend,
                          "execution.workers": cfg.execution.workers,
                          "execution.torch_threads": cfg.execution.torch_threads,
                          "execution.batch": cfg.execution.batch,
                          "decision_level": rule.decision_level,
                          "constraint_level": rule.constraint_level})
        with Progress(len(fleet), "compare", "chip") as progress:
            stuck = (load_stuck(cfg.path("fleet"), fleet)
                     if cfg.hardware.fault_model == "stuck_at" else None)
            per_chip, curves = compare.run_chips(baseline, data, fleet, policy_list, rule,
                                                 cfg.fat, cfg.hardware, amounts, device,
                                                 progress, stuck, cfg.execution)
        if cfg.group.enabled:
            shared = [g for g in groups if g.shared]
            with Progress(len(shared), "compare", "eFAT group") as progress:
                efat = compare.efat_rows(per_chip, groups, f"reduce-{cfg.plan.statistic}", rule,
                                         baseline, data, cfg.fat, cfg.hardware, device, progress,
                                         cfg.execution)
            per_chip = pd.concat([per_chip, efat], ignore_index=True)
            policy_list.append(compare.Policy(compare.EFAT, compare.EFAT, {}))
        summary = compare.summarize(per_chip, policy_list, rule.cap)
        oc = operating_points(rule, trials, fleet, curves, PlanSettings(
            cfg.plan.statistic, cfg.resilience.checkpoint_every, cfg.plan.safety_margin,
            cfg.plan.min_reached, cfg.plan.fleet_budget))
        records = summary.to_dict("records")
        for row in records:
            stage.child_run(row["policy"], {"policy": row["policy"]},
                            {k: [(0, row[k])] for k in POLICY_METRICS if _finite(row[k])},
                            {names.TAG_POLICY: row["policy"]})
        atomic.write_csv(per_chip, out_dir / "per_chip.csv")
        atomic.write_csv(pd.DataFrame([r for c in curves for r in c.rows()],
                                      columns=CURVE_COLUMNS), out_dir / "curves.csv")
        atomic.write_csv(summary, out_dir / "summary.csv")
        atomic.write_csv(oc, out_dir / "operating_characteristic.csv")
        plot_policy_comparison(per_chip, summary, out_dir / "policies.png",
                               rule.constraint_level)
        plot_operating_characteristic(oc, out_dir / "operating_characteristic.png")
        metrics = {"decision_level": rule.decision_level,
                   "constraint_level": rule.constraint_level, "n_chips": len(chip_ids),
                   "stage_seconds": time.perf_counter() - t0,
                   "policies": {r["policy"]: {k: r[k] for k in POLICY_METRICS} for r in records}}
        atomic.write_json(out_dir / "metrics.json", metrics)
        stage.log_artifacts(out_dir)
    lines = [f"  {r['policy']:>22}: ships {r['n_shipped']:>3}/{r['n_chips']}, "
             f"{r['n_meet_on_test']:>3} meet {rule.constraint_level:.4f} on test; yield "
             f"{r['yield']:.3f} of {r['n_recoverable']} recoverable, {r['n_escapes']} escapes, "
             f"{r['n_overkill']} overkill; {r['total_epochs']:g} epochs"
             + (f" ({r['epochs_ratio_to_it']:.2f} of {r['cheapest_fixed_as_many']})"
                if r["cheapest_fixed_as_many"] else "")
             for r in records]
    print("compare:\n" + "\n".join(lines) + f"\n  -> {out_dir}; MLflow run {stage.run_id}")
    return metrics


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

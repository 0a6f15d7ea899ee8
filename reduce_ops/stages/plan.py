"""`reduce-ops plan`: Step 2 of Reduce, a monotone fit of the retraining needed per fault rate
over the trials read back from MLflow, then every chip's planned epochs (or infeasible)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from reduce_ops import atomic, names, provenance, reports, resilience, tracking
from reduce_ops.config import Config, flatten
from reduce_ops.hardware import ArrayGeometry, FaultMap, load_fleet
from reduce_ops.planning import constraint_level, make_plan


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is made from: the logged trials, what they were measured for, the fleet."""

    run_id: str                # the resilience run
    trials: pd.DataFrame       # the long trials table
    level: float               # accuracy constraint, absolute
    baseline_accuracy: float
    granularity: float         # checkpoint spacing of the trials (resilience.checkpoint_every)
    fleet: list[FaultMap]
    identity: provenance.Identity

    @property
    def chips(self) -> pd.DataFrame:
        return pd.DataFrame({"chip_id": [m.chip_id for m in self.fleet],
                             "fault_rate": [m.fault_rate for m in self.fleet]})


def inputs(cfg: Config) -> PlanInputs:
    """Trials read back from MLflow (see provenance.resilience_run) and the current fleet."""
    identity = provenance.current_identity(cfg)
    source = provenance.resilience_run(cfg, identity)
    trials = resilience.logged_trials(tracking.tracking_uri(cfg.root), source.run_id)
    base_acc = source.metrics["baseline_test_accuracy"]
    level = constraint_level(cfg.constraint.kind, cfg.constraint.value, base_acc)
    fleet = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    granularity = float(source.params.get("resilience.checkpoint_every",
                                          cfg.resilience.checkpoint_every))
    return PlanInputs(source.run_id, trials, level, base_acc, granularity, fleet, identity)


def run(cfg: Config) -> dict[str, Any]:
    """Write results/plan/ (plan, curve points, figure, summary); returns the summary."""
    src = inputs(cfg)
    result = make_plan(src.trials, src.chips, src.level, cfg.plan.statistic, cfg.plan.metric,
                       src.granularity, cfg.plan.safety_margin, cfg.plan.crossing)
    plan = result.plan
    out_dir = cfg.path("results") / "plan"
    with tracking.stage_run(cfg.root, "plan", cfg.tracking.experiment,
                            provenance.dataset_ref(cfg)) as stage:
        stage.set_tags({names.TAG_RESILIENCE_RUN: src.run_id,
                        **provenance.identity_tags(src.identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("plan", "constraint")}))
        stage.log_params({"resilience_run_id": src.run_id, "granularity": src.granularity,
                          "n_chips": len(plan)})
        feasible = plan[plan["feasible"]]
        summary = {"run_id": stage.run_id, "resilience_run_id": src.run_id,
                   "constraint_level": src.level, "baseline_test_accuracy": src.baseline_accuracy,
                   "statistic": cfg.plan.statistic, "n_chips": len(plan),
                   "n_feasible": int(len(feasible)), "n_infeasible": int((~plan["feasible"]).sum()),
                   "total_planned_epochs": float(feasible["planned_epochs"].sum()),
                   "max_feasible_rate": float(result.curve.max_feasible_rate),
                   "baseline_hash": src.identity.baseline_hash,
                   "dataset_hash": src.identity.dataset_hash}
        atomic.write_csv(plan, out_dir / "plan.csv")
        atomic.write_csv(result.points, out_dir / "curve_points.csv")
        reports.plot_plan_curve(result.points, result.curve, plan, out_dir / "plan_curve.png",
                                statistic=cfg.plan.statistic, constraint_level=src.level)
        atomic.write_json(out_dir / "summary.json", summary)
        stage.log_numbers(summary)
        stage.log_artifacts(out_dir)
    print(f"plan: {summary['n_feasible']}/{len(plan)} chips feasible for accuracy >= "
          f"{src.level:.4f} ({cfg.plan.statistic} over repetitions), "
          f"{summary['total_planned_epochs']:g} epochs in all, reachable up to fault rate "
          f"{result.curve.max_feasible_rate:g} -> {out_dir}; from resilience run {src.run_id}")
    return summary

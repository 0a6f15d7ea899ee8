"""`reduce-ops plan`: Step 2 of Reduce, every chip's planned epochs (or infeasible) from the
trials read back from the resilience run, decided on the validation split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from reduce_ops import atomic, names, provenance, reports, resilience, tracking
from reduce_ops.config import Config, flatten
from reduce_ops.hardware import ArrayGeometry, FaultMap, load_fleet
from reduce_ops.planning import make_plan


@dataclass(frozen=True)
class PlanInputs:
    """What a plan is made from: the logged trials, what they were measured for, the fleet."""

    run_id: str                # the resilience run
    trials: pd.DataFrame       # the long trials table
    decision_level: float      # validation accuracy every decision compares with
    constraint_level: float    # test accuracy a shipped chip is judged against
    baseline_val_accuracy: float
    baseline_test_accuracy: float
    fleet: list[FaultMap]
    identity: provenance.Identity

    @property
    def chips(self) -> pd.DataFrame:
        return pd.DataFrame({"chip_id": [m.chip_id for m in self.fleet],
                             "fault_rate": [m.fault_rate for m in self.fleet]})


def inputs(cfg: Config) -> PlanInputs:
    """The checked resilience run's trials (see provenance.resilience_run) and the fleet."""
    identity = provenance.current_identity(cfg)
    source = provenance.resilience_run(cfg, identity)
    trials = resilience.logged_trials(tracking.tracking_uri(cfg.root), source.run_id)
    m = source.metrics
    fleet = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    return PlanInputs(source.run_id, trials, m["decision_level"], m["constraint_level"],
                      m["baseline_val_accuracy"], m["baseline_test_accuracy"], fleet, identity)


def plan_for(cfg: Config, src: PlanInputs, statistic: str):  # noqa: ANN201 - PlanResult
    """The plan for one statistic over repetitions: the retraining each chip needs to pass
    verification (validation accuracy >= decision level + verify.margin) within the cap."""
    return make_plan(src.trials, src.chips, src.decision_level + cfg.verify.margin, statistic,
                     cfg.resilience.checkpoint_every, cfg.plan.safety_margin,
                     cfg.plan.budget_cap, cfg.plan.min_reached)


def run(cfg: Config) -> dict[str, Any]:
    """Write results/plan/ (plan, curve points, figure, summary); returns the summary."""
    src = inputs(cfg)
    result = plan_for(cfg, src, cfg.plan.statistic)
    plan = result.plan
    out_dir = cfg.path("results") / "plan"
    with tracking.stage_run(cfg.root, "plan", cfg.tracking.experiment,
                            provenance.dataset_ref(cfg)) as stage:
        stage.set_tags({names.TAG_RESILIENCE_RUN: src.run_id,
                        **provenance.identity_tags(src.identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("plan", "constraint", "verify")}))
        stage.log_params({"resilience_run_id": src.run_id,
                          "granularity": cfg.resilience.checkpoint_every, "n_chips": len(plan)})
        feasible = plan[plan["feasible"]]
        summary = {"run_id": stage.run_id, "resilience_run_id": src.run_id,
                   "decision_level": src.decision_level,
                   "constraint_level": src.constraint_level,
                   "baseline_val_accuracy": src.baseline_val_accuracy,
                   "baseline_test_accuracy": src.baseline_test_accuracy,
                   "verify_margin": cfg.verify.margin, "statistic": cfg.plan.statistic,
                   "min_reached": cfg.plan.min_reached, "budget_cap": cfg.plan.budget_cap,
                   "n_chips": len(plan), "n_feasible": int(len(feasible)),
                   "n_infeasible": int((~plan["feasible"]).sum()),
                   "total_planned_epochs": float(feasible["planned_epochs"].sum()),
                   "max_feasible_rate": float(result.curve.max_feasible_rate),
                   "baseline_hash": src.identity.baseline_hash,
                   "dataset_hash": src.identity.dataset_hash}
        atomic.write_csv(plan, out_dir / "plan.csv")
        atomic.write_csv(result.points, out_dir / "curve_points.csv")
        reports.plot_plan_curve(result.points, result.curve, plan, out_dir / "plan_curve.png",
                                statistic=cfg.plan.statistic,
                                constraint_level=src.decision_level + cfg.verify.margin)
        atomic.write_json(out_dir / "summary.json", summary)
        stage.log_numbers(summary)
        stage.log_artifacts(out_dir)
    print(f"plan: {summary['n_feasible']}/{len(plan)} chips feasible within "
          f"{cfg.plan.budget_cap:g} epochs for validation accuracy >= {src.decision_level:.4f} "
          f"({cfg.plan.statistic} over repetitions), {summary['total_planned_epochs']:g} epochs "
          f"planned in all, reachable up to fault rate {result.curve.max_feasible_rate:g} "
          f"-> {out_dir}; from resilience run {src.run_id}")
    return summary

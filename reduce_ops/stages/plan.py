"""`reduce-ops plan`: Step 2 of Reduce, every chip's planned epochs (or infeasible) from the
trials read back from the resilience run, decided on the validation split."""

from __future__ import annotations

from typing import Any

from reduce_ops import names, provenance
from reduce_ops.config import Config, flatten
from reduce_ops.hardware import ArrayGeometry, load_fleet
from reduce_ops.planning import on_spare_budget, plan_for_rule
from reduce_ops.records import plan as plan_record
from reduce_ops.records import trials as trials_record
from reduce_ops.reports.plan import plot_plan_curve
from reduce_ops.shipping import ShippingRule
from reduce_ops.tracking.runs import stage_run
from reduce_ops.tracking.store import tracking_uri


def run(cfg: Config) -> dict[str, Any]:
    """Write results/plan/ (plan, curve points, figure, summary); returns the summary."""
    identity = provenance.current_identity(cfg)
    source = provenance.resilience_run(cfg, identity)     # checked against params and files
    trials = trials_record.read_logged(tracking_uri(cfg.root), source.run_id)
    m = source.metrics
    # for the baseline accuracies the resilience run measured; margin, escape rate and cap are
    # the ones it was measured for (checked above), the step is params'
    sizes = provenance.dataset_meta(cfg)["split_sizes"]
    rule = ShippingRule.from_config(cfg, m["baseline_val_accuracy"],
                                    m["baseline_test_accuracy"], sizes["val"], sizes["test"])
    fleet = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    result = plan_for_rule(trials, fleet, rule, cfg.plan.statistic,
                           cfg.resilience.checkpoint_every, cfg.plan.safety_margin,
                           cfg.plan.min_reached, cfg.plan.fleet_budget)
    plan = result.plan
    out_dir = plan_record.directory(cfg.path("results"))
    with stage_run(cfg.root, "plan", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.set_tags({names.TAG_RESILIENCE_RUN: source.run_id,
                        **provenance.identity_tags(identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("plan", "constraint", "verify")}))
        stage.log_params({"resilience_run_id": source.run_id,
                          "granularity": cfg.resilience.checkpoint_every, "n_chips": len(plan)})
        feasible = plan[plan["feasible"]]
        summary = plan_record.PlanSummary(
            stage.run_id, source.run_id, rule, cfg.plan.statistic, identity.baseline_hash,
            identity.dataset_hash,
            {"baseline_val_accuracy": m["baseline_val_accuracy"],
             "baseline_test_accuracy": m["baseline_test_accuracy"],
             "min_reached": cfg.plan.min_reached, "fleet_budget": cfg.plan.fleet_budget,
             "n_beyond_edge": int(on_spare_budget(plan).sum()),
             "n_chips": len(plan),
             "n_feasible": int(len(feasible)), "n_infeasible": int((~plan["feasible"]).sum()),
             "total_planned_epochs": float(feasible["planned_epochs"].sum()),
             "max_feasible_rate": float(result.curve.max_feasible_rate)})
        written = plan_record.write(
            out_dir, plan, result.points, summary,
            lambda path: plot_plan_curve(result.points, result.curve, plan, path,
                                                 statistic=cfg.plan.statistic,
                                                 constraint_level=rule.ship_level))
        stage.log_numbers(written)
        stage.log_artifacts(out_dir)
    print(f"plan: {written['n_feasible']}/{len(plan)} chips feasible within "
          f"{rule.cap:g} epochs for validation accuracy >= {rule.decision_level:.4f} "
          f"({cfg.plan.statistic} over repetitions), {written['total_planned_epochs']:g} epochs "
          f"planned in all, reachable up to fault rate {result.curve.max_feasible_rate:g} "
          f"({written['n_beyond_edge']} of the chips beyond it trained to the cap on the spare "
          f"budget) "
          f"-> {out_dir}; from resilience run {source.run_id}")
    return written

"""`reduce-ops fat`: Step 3 of Reduce, FAT per chip as planned, one child run and one registered
model per chip."""

from __future__ import annotations

import time
from typing import Any

from reduce_ops import atomic, fleet, names, provenance
from reduce_ops.config import Config, flatten
from reduce_ops.errors import ReduceOpsError
from reduce_ops.data import load_prepared
from reduce_ops.hardware import ArrayGeometry, load_fleet
from reduce_ops.models import load_checkpoint
from reduce_ops.progress import Progress
from reduce_ops.tracking import stage_run, tracking_uri
from reduce_ops.training import resolve_device


def run(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Write results/fat/ (chips.csv, summary); `force` retrains chips already registered for
    the current plan. Returns the summary."""
    t0 = time.perf_counter()
    plan_dir = cfg.path("results") / "plan"
    plan, plan_info = fleet.read_plan(plan_dir)
    identity = provenance.current_identity(cfg)
    provenance.Identity(plan_info.baseline_hash, plan_info.dataset_hash).require_match(
        identity, f"the plan in {plan_dir}",
        "run `reduce-ops resilience` and `reduce-ops plan` again")
    if plan_info.budget_cap != cfg.plan.budget_cap:
        raise ReduceOpsError(f"the plan in {plan_dir} was made for plan.budget_cap "
                             f"{plan_info.budget_cap:g} (now {cfg.plan.budget_cap:g}); run "
                             f"`reduce-ops resilience` and `reduce-ops plan` again")
    maps = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    jobs = fleet.chip_jobs(plan, maps, plan_dir / "plan.csv")
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, ckpt = load_checkpoint(cfg.path("baseline"), device)
    out_dir = cfg.path("results") / "fat"
    with stage_run(cfg.root, "fat", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage, \
            Progress(len(jobs), "fat", "chip") as progress:
        ctx = fleet.FleetContext(plan_info, cfg.fat, cfg.hardware.layer_types, device,
                                 cfg.registry.prefix, tracking_uri(cfg.root), dict(ckpt["arch"]),
                                 data.x["test"][:2].numpy(), cfg.verify.margin, cfg.verify.step,
                                 force=force, warn=progress.note)
        stage.set_tags({names.TAG_PLAN_RUN: plan_info.run_id,
                        **provenance.identity_tags(identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("fat", "hardware", "registry",
                                                                   "verify")}))
        stage.log_params({"plan_run_id": plan_info.run_id, "n_chips": len(jobs),
                          "decision_level": plan_info.decision_level,
                          "constraint_level": plan_info.constraint_level,
                          "budget_cap": plan_info.budget_cap, "force": force,
                          "device": str(device)})
        outcomes = fleet.run_fleet(stage, jobs, baseline, data, ctx, progress)
        seconds = time.perf_counter() - t0
        summary = {**fleet.fleet_summary(outcomes, plan_info), "run_id": stage.run_id,
                   "stage_seconds": seconds, "tracking_seconds": stage.tracking_seconds}
        atomic.write_csv(fleet.chips_table(outcomes), out_dir / "chips.csv")
        atomic.write_json(out_dir / "summary.json", summary)
        stage.log_numbers(summary)
        stage.log_artifacts(out_dir)
    s = summary
    print(f"fat: shipped {s['n_shipped']}/{s['n_chips']} chips, verified at validation accuracy "
          f">= {plan_info.decision_level:.4f} + {cfg.verify.margin:g} ({s['n_rejected_by_plan']} "
          f"rejected by the plan, {s['n_rejected_at_cap']} at the {plan_info.budget_cap:g}-epoch "
          f"cap); {s['n_meet_on_test']} of the shipped meet {plan_info.constraint_level:.4f} on "
          f"test; {s['total_epochs']:g} epochs in all ({s['total_planned_epochs']:g} planned, "
          f"{s['n_extended']} chips extended; {s['n_skipped']} chips registered for this plan "
          f"before) in {seconds:.0f} s -> {out_dir}; MLflow run {stage.run_id}")
    return summary

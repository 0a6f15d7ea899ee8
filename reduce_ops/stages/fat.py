"""`reduce-ops fat`: Step 3 of Reduce, FAT per chip as planned, one child run and one registered
model per chip."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from reduce_ops import atomic, execution, fleet, names, provenance
from reduce_ops.config import Config, flatten
from reduce_ops.errors import ReduceOpsError
from reduce_ops.data import load_prepared
from reduce_ops.grouping import fuse, read_groups
from reduce_ops.hardware import ArrayGeometry, FaultMap, load_fleet
from reduce_ops.hardware.stuckfleet import load_stuck
from reduce_ops.models import load_checkpoint
from reduce_ops.progress import Progress
from reduce_ops.tracking import BackgroundTracking, reap_abandoned, stage_run, tracking_uri
from reduce_ops.training import resolve_device


def _units(cfg: Config, jobs: list[fleet.ChipJob], plan_run_id: str) -> list[fleet.Unit]:
    """The FAT runs to do: one per eFAT group of results/group/groups.csv (a chip on its own
    is a group of one), checked against the plan."""
    group_dir = cfg.path("results") / "group"
    groups = read_groups(group_dir / "groups.csv")
    summary = json.loads((group_dir / "summary.json").read_text())
    if summary.get("plan_run_id") != plan_run_id:
        raise ReduceOpsError(f"{group_dir}: the groups were formed for plan "
                             f"{summary.get('plan_run_id')}, not the current plan {plan_run_id}; "
                             f"run `reduce-ops group` again")
    by_id = {j.chip_id: j for j in jobs}
    planned = {j.chip_id for j in jobs if j.feasible}
    grouped = [c for members in groups["members"] for c in members]
    if sorted(grouped) != sorted(planned):
        raise ReduceOpsError(f"{group_dir}/groups.csv does not hold exactly the chips the plan "
                             f"trains; run `reduce-ops group` again")
    units = []
    for row in groups.itertuples(index=False):
        members = tuple(by_id[c] for c in row.members)
        if len(members) == 1:
            units.append(fleet.Unit.chip(members[0]))
        else:
            fused = FaultMap(row.group_id, fuse([m.fault_map for m in members]), "fused")
            units.append(fleet.Unit(f"group {row.group_id}", fused, float(row.planned_epochs),
                                    members, row.group_id))
    return units


def run(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Write results/fat/ (chips.csv, summary); `force` retrains chips already registered for
    the current plan. Returns the summary."""
    t0 = time.perf_counter()
    execution.check_address(cfg.execution)
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
    stuck = (load_stuck(cfg.path("fleet"), maps) if cfg.hardware.fault_model == "stuck_at"
             else None)
    jobs = fleet.chip_jobs(plan, maps, plan_dir / "plan.csv", stuck)
    units = _units(cfg, jobs, plan_info.run_id)
    rejected = [j for j in jobs if not j.feasible]
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, ckpt = load_checkpoint(cfg.path("baseline"), device)
    out_dir = cfg.path("results") / "fat"
    exe = cfg.execution
    if exe.backend == "local" and exe.torch_threads == 0:
        # one core goes to the process that logs and registers the models meanwhile
        exe = dataclasses.replace(exe, torch_threads=max(1, (os.cpu_count() or 1) - 1))
    # fat runs of this plan whose process died (SIGKILL, out of memory) end KILLED; their
    # registered chips are reused below like those of any earlier run of the plan
    reap_abandoned(tracking_uri(cfg.root), {names.TAG_STAGE: "fat",
                                            names.TAG_PLAN_RUN: plan_info.run_id})
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
                          "execution.backend": cfg.execution.backend,
                          "execution.workers": cfg.execution.workers,
                          "execution.torch_threads": exe.torch_threads,
                          "device": str(device)})
        # logging and registering each model overlaps the next chips' training
        queue = BackgroundTracking(stage).start()
        try:
            outcomes = fleet.run_fleet(stage, units, rejected, baseline, data, ctx, progress,
                                       exe, queue)
        finally:
            queue.close()
        seconds = time.perf_counter() - t0
        # MLflow work on the critical path: the driver's own calls, and its waits for the
        # process that logs and registers the chips' models
        critical = stage.tracking_seconds + queue.blocked_seconds
        summary = {**fleet.fleet_summary(outcomes, plan_info), "run_id": stage.run_id,
                   "stage_seconds": seconds,
                   "tracking_seconds": stage.tracking_seconds + queue.worker_seconds,
                   "tracking_critical_seconds": critical,
                   "tracking_blocked_seconds": queue.blocked_seconds,
                   "tracking_critical_fraction": critical / seconds}
        atomic.write_csv(fleet.chips_table(outcomes), out_dir / "chips.csv")
        atomic.write_json(out_dir / "summary.json", summary)
        stage.log_numbers(summary)
        stage.log_artifacts(out_dir)
    s = summary
    print(f"fat: shipped {s['n_shipped']}/{s['n_chips']} chips, verified at validation accuracy "
          f">= {plan_info.decision_level:.4f} + {cfg.verify.margin:g} ({s['n_rejected_by_plan']} "
          f"rejected by the plan, {s['n_rejected_at_cap']} at the {plan_info.budget_cap:g}-epoch "
          f"cap); {s['n_meet_on_test']} of the shipped meet {plan_info.constraint_level:.4f} on "
          f"test; {s['total_epochs']:g} epochs in {s['n_fat_runs']} FAT runs "
          f"({s['n_grouped_chips']} chips in eFAT groups; {s['total_planned_epochs']:g} planned, "
          f"{s['n_extended']} runs extended; {s['n_skipped']} chips registered for this plan "
          f"before) in {seconds:.0f} s -> {out_dir}; MLflow run {stage.run_id}")
    return summary

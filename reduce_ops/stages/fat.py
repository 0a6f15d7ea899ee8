"""`reduce-ops fat`: Step 3 of Reduce, FAT per chip as planned, one child run and one registered
model per chip."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from reduce_ops import execution, names, provenance
from reduce_ops.config import Config, flatten
from reduce_ops.data import load_prepared
from reduce_ops.hardware import ArrayGeometry, load_fleet
from reduce_ops.hardware.stuckfleet import load_stuck
from reduce_ops.models import Preprocess, load_checkpoint
from reduce_ops.progress import Progress
from reduce_ops.records import chips as chips_record
from reduce_ops.records import groups as groups_record
from reduce_ops.records import plan as plan_record
from reduce_ops.retraining import runview, schedule
from reduce_ops.retraining.registration import RegistryContext, settings_key
from reduce_ops.retraining.units import chip_jobs, units
from reduce_ops.retraining.worker import TrainSettings
from reduce_ops.tracking.logger import BackgroundTracking
from reduce_ops.tracking.runs import reap_abandoned, stage_run
from reduce_ops.tracking.store import tracking_uri
from reduce_ops.training import resolve_device


def run(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Write results/fat/ (chips.csv, summary); `force` retrains chips already registered for
    the current plan. Returns the summary."""
    t0 = time.perf_counter()
    execution.check_address(cfg.execution)
    plan = plan_record.read_current(cfg)
    rule = plan.rule
    identity = provenance.current_identity(cfg)
    fleet = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    stuck = (load_stuck(cfg.path("fleet"), fleet) if cfg.hardware.fault_model == "stuck_at"
             else None)
    planned = plan_record.for_fleet(plan, fleet, plan_record.directory(cfg.path("results"))
                                    / plan_record.PLAN_FILE)
    jobs = chip_jobs(planned, stuck)
    runs = units(jobs, groups_record.read(groups_record.directory(cfg.path("results")), plan,
                                          fleet))
    rejected = [j for j in jobs if not j.feasible]
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, ckpt = load_checkpoint(cfg.path("baseline"), device, cfg.hardware.exclude_layers)
    out_dir = chips_record.directory(cfg.path("results"))
    exe = cfg.execution
    if not execution.pooled(exe) and exe.torch_threads == 0:
        # one core goes to the process that logs and registers the models meanwhile
        exe = dataclasses.replace(exe, torch_threads=max(1, (os.cpu_count() or 1) - 1))
    uri = tracking_uri(cfg.root)
    # fat runs of this plan whose process died (SIGKILL, out of memory) end KILLED; their
    # registered chips are reused below like those of any earlier run of the plan
    reap_abandoned(uri, {names.TAG_STAGE: "fat", names.TAG_PLAN_RUN: plan.run_id})
    with stage_run(cfg.root, "fat", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg), children="chips") as stage, \
            Progress(len(jobs), "fat", "chip") as progress:
        settings = TrainSettings(cfg.fat, cfg.hardware.layer_types, device, rule)
        pre = Preprocess.from_meta(data.meta)        # served models take raw images
        ctx = RegistryContext(plan.run_id, rule, plan.summary.dataset_hash, cfg.registry.prefix,
                              dict(ckpt["arch"]), pre.raw(data.x["test"][:2]).numpy(), pre,
                              settings_key=settings_key(settings, plan.run_id,
                                                        identity.baseline_hash or "",
                                                        identity.dataset_hash))
        stage.set_tags({names.TAG_PLAN_RUN: plan.run_id, **provenance.identity_tags(identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("fat", "hardware", "registry",
                                                                   "verify")}))
        stage.log_params({"plan_run_id": plan.run_id, "n_chips": len(jobs),
                          "decision_level": rule.decision_level,
                          "constraint_level": rule.constraint_level,
                          "budget_cap": rule.cap, "force": force,
                          "execution.backend": cfg.execution.backend,
                          "execution.workers": cfg.execution.workers,
                          "execution.torch_threads": exe.torch_threads,
                          "execution.batch": exe.batch,
                          "device": str(device)})
        # logging and registering each model overlaps the next chips' training
        queue = BackgroundTracking(stage).start()
        try:
            outcomes = schedule.run(stage, runs, rejected, baseline, data, settings, ctx, uri,
                                    force, progress, exe, queue)
        finally:
            queue.close()
        seconds = time.perf_counter() - t0
        # MLflow work on the critical path: the driver's own calls, and its waits for the
        # process that logs and registers the chips' models
        critical = stage.tracking_seconds + queue.blocked_seconds
        summary = {**chips_record.summarize(outcomes, plan.run_id, rule.decision_level,
                                            rule.constraint_level, rule.cap),
                   "run_id": stage.run_id, "stage_seconds": seconds,
                   "tracking_seconds": stage.tracking_seconds + queue.worker_seconds,
                   "tracking_critical_seconds": critical,
                   "tracking_blocked_seconds": queue.blocked_seconds,
                   "tracking_critical_fraction": critical / seconds}
        chips_record.write(out_dir, outcomes, summary)
        stage.log_numbers(summary)
        stage.describe(runview.fleet_description(outcomes, stage.children_experiment,
                                                 cfg.registry.prefix))
        stage.log_artifacts(out_dir)
    s = summary
    print(f"fat: shipped {s['n_shipped']}/{s['n_chips']} chips, verified at validation accuracy "
          f">= {rule.decision_level:.4f} + {rule.margin:g} ({s['n_rejected_by_plan']} "
          f"rejected by the plan, {s['n_rejected_at_cap']} at the {rule.cap:g}-epoch "
          f"cap); {s['n_meet_on_test']} of the shipped meet {rule.constraint_level:.4f} on "
          f"test; {s['total_epochs']:g} epochs in {s['n_fat_runs']} FAT runs "
          f"({s['n_grouped_chips']} chips in eFAT groups; {s['total_planned_epochs']:g} planned, "
          f"{s['n_extended']} runs extended; {s['n_skipped']} chips registered for this plan "
          f"before) in {seconds:.0f} s -> {out_dir}; MLflow run {stage.run_id}")
    return summary

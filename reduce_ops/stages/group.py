"""`reduce-ops group`: eFAT, fuse the fault maps of chips whose shared retraining saves epochs."""

from __future__ import annotations

import time
from typing import Any

from reduce_ops import names, provenance
from reduce_ops.config import Config, flatten
from reduce_ops.grouping import Group, form_groups, fused_plan
from reduce_ops.hardware import ArrayGeometry, build_masks, load_fleet, pruned_fraction
from reduce_ops.models import load_checkpoint
from reduce_ops.records import groups as groups_record
from reduce_ops.records import plan as plan_record
from reduce_ops.reports.groups import plot_groups
from reduce_ops.tracking.runs import stage_run


def run(cfg: Config) -> dict[str, Any]:
    """Write results/group/ (groups.csv, figure, summary); returns the summary."""
    t0 = time.perf_counter()
    plan_dir = plan_record.directory(cfg.path("results"))
    plan = plan_record.read_current(cfg)
    identity = provenance.current_identity(cfg)
    fleet = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    planned = plan_record.for_fleet(plan, fleet, plan_dir / plan_record.PLAN_FILE)
    _, planned_at, miss_at = fused_plan(plan.points, plan.rule.cap,
                                        cfg.resilience.checkpoint_every, cfg.plan.safety_margin)

    # chips the plan rejected stay out; chips that need no retraining stay on their own
    trained = [c for c in planned if c.feasible and c.planned_epochs > 0]
    alone = [c for c in planned if c.feasible and c.planned_epochs == 0]
    g = cfg.group
    groups = form_groups([c.fault_map for c in trained], [c.planned_epochs for c in trained],
                         planned_at, g.max_size if g.enabled else 1, g.candidates,
                         g.sample_pes, refine_rounds=g.refine_rounds,
                         miss_at=miss_at if g.objective == "expected" else None,
                         cap=plan.rule.cap)
    groups += [Group(f"alone-{c.chip_id}", (c.chip_id,), c.fault_map.faulty, 0.0, 0.0)
               for c in alone]
    baseline, _ = load_checkpoint(cfg.path("baseline"),
                                  exclude_layers=cfg.hardware.exclude_layers)
    table = groups_record.table(groups, lambda fused: pruned_fraction(
        build_masks(baseline, fused, cfg.hardware.layer_types)))
    out_dir = groups_record.directory(cfg.path("results"))
    with stage_run(cfg.root, "group", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.set_tags({names.TAG_PLAN_RUN: plan.run_id, **provenance.identity_tags(identity)})
        stage.log_params(flatten({"group": cfg.to_dict()["group"]}))
        stage.log_params({"plan_run_id": plan.run_id})
        shared = table[table["n_members"] > 1]
        before = float(table["members_planned_epochs"].sum())
        after = float(table["planned_epochs"].sum())
        summary = {"run_id": stage.run_id, "plan_run_id": plan.run_id,
                   "enabled": g.enabled, "n_chips_planned": int(table["n_members"].sum()),
                   "n_groups": int(len(shared)), "n_grouped_chips": int(shared["n_members"].sum()),
                   "n_runs": int(len(table)), "epochs_before": before, "epochs_after": after,
                   "reward": before - after, "epochs_ratio": after / before if before else 1.0,
                   "stage_seconds": time.perf_counter() - t0}
        groups_record.write(out_dir, table, summary, lambda path: plot_groups(
            table.assign(members=[list(grp.members) for grp in groups]), plan.chips, path))
        stage.log_numbers(summary)
        stage.log_artifacts(out_dir)
    print(f"group: {summary['n_grouped_chips']} of {summary['n_chips_planned']} planned chips in "
          f"{summary['n_groups']} groups of 2 to {g.max_size}; planned epochs {before:g} -> "
          f"{after:g} ({summary['epochs_ratio']:.2f}), {summary['n_runs']} FAT runs instead of "
          f"{summary['n_chips_planned']} -> {out_dir}; MLflow run {stage.run_id}")
    return summary

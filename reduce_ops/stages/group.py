"""`reduce-ops group`: eFAT, fuse the fault maps of chips whose shared retraining saves epochs."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from reduce_ops import atomic, fleet, names, provenance, reports
from reduce_ops.config import Config, flatten
from reduce_ops.grouping import GROUP_COLUMNS, MEMBER_SEP, Group, form_groups, fused_plan
from reduce_ops.hardware import ArrayGeometry, build_masks, load_fleet, pruned_fraction
from reduce_ops.models import load_checkpoint
from reduce_ops.tracking import stage_run


def run(cfg: Config) -> dict[str, Any]:
    """Write results/group/ (groups.csv, figure, summary); returns the summary."""
    t0 = time.perf_counter()
    plan_dir = cfg.path("results") / "plan"
    plan, plan_info = fleet.read_plan(plan_dir)
    identity = provenance.current_identity(cfg)
    provenance.Identity(plan_info.baseline_hash, plan_info.dataset_hash).require_match(
        identity, f"the plan in {plan_dir}", "run `reduce-ops plan` again")
    maps = {m.chip_id: m for m in load_fleet(cfg.path("fleet"),
                                             ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))}
    fleet.chip_jobs(plan, list(maps.values()), plan_dir / "plan.csv")   # plan matches the fleet
    points = pd.read_csv(plan_dir / "curve_points.csv")
    _, planned_at, miss_at = fused_plan(points, plan_info.budget_cap,
                                        cfg.resilience.checkpoint_every, cfg.plan.safety_margin)

    # chips the plan rejected stay out; chips that need no retraining stay on their own
    trained = plan[plan["feasible"] & (plan["planned_epochs"] > 0)]
    alone = plan[plan["feasible"] & (plan["planned_epochs"] == 0)]
    g = cfg.group
    groups = form_groups([maps[c] for c in trained["chip_id"]], trained["planned_epochs"],
                         planned_at, g.max_size if g.enabled else 1, g.candidates,
                         g.sample_pes, refine_rounds=g.refine_rounds,
                         miss_at=miss_at if g.objective == "expected" else None,
                         cap=plan_info.budget_cap)
    groups += [Group(f"alone-{c}", (c,), maps[c].faulty, 0.0, 0.0) for c in alone["chip_id"]]
    baseline, _ = load_checkpoint(cfg.path("baseline"))
    table = pd.DataFrame([(grp.group_id, MEMBER_SEP.join(grp.members), len(grp.members),
                           grp.fault_rate,
                           pruned_fraction(build_masks(baseline, grp.fused,
                                                       cfg.hardware.layer_types)),
                           grp.planned_epochs, grp.members_planned, grp.reward)
                          for grp in groups], columns=GROUP_COLUMNS)
    out_dir = cfg.path("results") / "group"
    with stage_run(cfg.root, "group", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.set_tags({names.TAG_PLAN_RUN: plan_info.run_id,
                        **provenance.identity_tags(identity)})
        stage.log_params(flatten({"group": cfg.to_dict()["group"]}))
        stage.log_params({"plan_run_id": plan_info.run_id})
        shared = table[table["n_members"] > 1]
        before = float(table["members_planned_epochs"].sum())
        after = float(table["planned_epochs"].sum())
        summary = {"run_id": stage.run_id, "plan_run_id": plan_info.run_id,
                   "enabled": g.enabled, "n_chips_planned": int(table["n_members"].sum()),
                   "n_groups": int(len(shared)), "n_grouped_chips": int(shared["n_members"].sum()),
                   "n_runs": int(len(table)), "epochs_before": before, "epochs_after": after,
                   "reward": before - after, "epochs_ratio": after / before if before else 1.0,
                   "stage_seconds": time.perf_counter() - t0}
        atomic.write_csv(table, out_dir / "groups.csv")
        reports.plot_groups(table.assign(members=[list(grp.members) for grp in groups]), plan,
                            out_dir / "groups.png")
        atomic.write_json(out_dir / "summary.json", summary)
        stage.log_numbers(summary)
        stage.log_artifacts(out_dir)
    print(f"group: {summary['n_grouped_chips']} of {summary['n_chips_planned']} planned chips in "
          f"{summary['n_groups']} groups of 2 to {g.max_size}; planned epochs {before:g} -> "
          f"{after:g} ({summary['epochs_ratio']:.2f}), {summary['n_runs']} FAT runs instead of "
          f"{summary['n_chips_planned']} -> {out_dir}; MLflow run {stage.run_id}")
    return summary

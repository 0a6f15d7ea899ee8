"""`reduce-ops compare`: fixed-epoch policies, the verified Reduce plan and a per-chip oracle on
the fleet (the paper's Fig. 3), from one FAT run per chip."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from reduce_ops import atomic, compare, execution, names, provenance
from reduce_ops.config import Config, flatten
from reduce_ops.data import load_prepared
from reduce_ops.errors import ReduceOpsError
from reduce_ops.hardware import ArrayGeometry, FaultMap, load_fleet
from reduce_ops.hardware.stuckfleet import load_stuck
from reduce_ops.models import load_checkpoint
from reduce_ops.planning import plan_for_rule
from reduce_ops.progress import Progress
from reduce_ops.records import groups as groups_record
from reduce_ops.records import plan as plan_record
from reduce_ops.records import trials as trials_record
from reduce_ops.reports.compare import plot_policy_comparison
from reduce_ops.tracking.runs import stage_run
from reduce_ops.tracking.store import tracking_uri
from reduce_ops.training import resolve_device


def _reduce_plans(cfg: Config, plan: plan_record.Plan,
                  fleet: list[FaultMap]) -> dict[str, dict[str, float]]:
    """{policy name: planned epochs by chip} for every statistic compared: the plan record's
    own, the others planned the same way from the same logged trials."""
    if plan.summary.statistic != cfg.plan.statistic:
        raise ReduceOpsError(f"the plan in {plan_record.directory(cfg.path('results'))} was made "
                             f"for plan.statistic {plan.summary.statistic} (now "
                             f"{cfg.plan.statistic}); run `reduce-ops plan` again")
    trials = None
    plans = {}
    for stat in dict.fromkeys([*cfg.compare.statistics, cfg.plan.statistic]):
        if stat == plan.summary.statistic:
            plans[f"reduce-{stat}"] = plan_record.epochs_by_chip(plan)
            continue
        if trials is None:
            trials = trials_record.read_logged(tracking_uri(cfg.root),
                                               plan.summary.resilience_run_id)
        other = plan_for_rule(trials, fleet, plan.rule, stat, cfg.resilience.checkpoint_every,
                              cfg.plan.safety_margin, cfg.plan.min_reached).plan
        plans[f"reduce-{stat}"] = dict(zip(other["chip_id"],
                                           other["planned_epochs"].astype(float)))
    return plans


def run(cfg: Config) -> dict[str, Any]:
    """Write results/compare/ (per chip, summary, metrics, Fig. 3); returns the metrics."""
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
    chip_ids = [m.chip_id for m in fleet]
    policy_list = compare.policies(cfg.compare.fixed_epochs, _reduce_plans(cfg, plan, fleet),
                                   chip_ids)
    groups = (groups_record.read(groups_record.directory(cfg.path("results")), plan, fleet)
              if cfg.group.enabled else [])
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, _ = load_checkpoint(cfg.path("baseline"), device)
    out_dir = cfg.path("results") / "compare"
    with stage_run(cfg.root, "compare", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.set_tags({names.TAG_RESILIENCE_RUN: source.run_id,
                        **provenance.identity_tags(identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("compare", "plan", "verify",
                                                                   "constraint", "fat")}))
        stage.log_params({"resilience_run_id": source.run_id, "n_chips": len(chip_ids),
                          "execution.backend": cfg.execution.backend,
                          "execution.workers": cfg.execution.workers,
                          "execution.torch_threads": cfg.execution.torch_threads,
                          "decision_level": rule.decision_level,
                          "constraint_level": rule.constraint_level})
        with Progress(len(fleet), "compare", "chip") as progress:
            stuck = (load_stuck(cfg.path("fleet"), fleet)
                     if cfg.hardware.fault_model == "stuck_at" else None)
            per_chip = compare.run_chips(baseline, data, fleet, policy_list, rule, cfg.fat,
                                         cfg.hardware, device, progress, stuck, cfg.execution)
        if cfg.group.enabled:
            shared = [g for g in groups if g.shared]
            with Progress(len(shared), "compare", "eFAT group") as progress:
                efat = compare.efat_rows(per_chip, groups, f"reduce-{cfg.plan.statistic}", rule,
                                         baseline, data, cfg.fat, cfg.hardware, device, progress,
                                         cfg.execution)
            per_chip = pd.concat([per_chip, efat], ignore_index=True)
            policy_list.append(compare.Policy(compare.EFAT, compare.EFAT, {}))
        summary = compare.summarize(per_chip, policy_list)
        for row in summary.itertuples(index=False):
            stage.child_run(f"policy {row.policy}", {"policy": row.policy},
                            {k: [(0, getattr(row, k))] for k in
                             ("n_shipped", "n_meet_on_test", "meet_rate", "total_epochs",
                              "epochs_per_shipped", "epochs_ratio_to_it")},
                            {names.TAG_POLICY: row.policy})
        atomic.write_csv(per_chip, out_dir / "per_chip.csv")
        atomic.write_csv(summary, out_dir / "summary.csv")
        plot_policy_comparison(per_chip, summary, out_dir / "policies.png",
                                       rule.constraint_level)
        metrics = {"decision_level": rule.decision_level,
                   "constraint_level": rule.constraint_level, "n_chips": len(chip_ids),
                   "stage_seconds": time.perf_counter() - t0,
                   "policies": {r.policy: {k: getattr(r, k) for k in
                                           ("n_shipped", "n_meet_on_test", "meet_rate",
                                            "n_meet_unchecked", "total_epochs",
                                            "epochs_ratio_to_it")}
                                for r in summary.itertuples(index=False)}}
        atomic.write_json(out_dir / "metrics.json", metrics)
        stage.log_artifacts(out_dir)
    lines = [f"  {r.policy:>14}: ships {r.n_shipped:>3}/{r.n_chips}, {r.n_meet_on_test:>3} of them "
             f"meet {rule.constraint_level:.4f} on test ({r.n_meet_unchecked} trained chips do), "
             f"{r.total_epochs:g} epochs"
             + (f" ({r.epochs_ratio_to_it:.2f} of {r.cheapest_fixed_as_many})"
                if r.cheapest_fixed_as_many else "")
             for r in summary.itertuples(index=False)]
    print("compare:\n" + "\n".join(lines) + f"\n  -> {out_dir}; MLflow run {stage.run_id}")
    return metrics

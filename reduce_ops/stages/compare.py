"""`reduce-ops compare`: fixed-epoch policies, the verified Reduce plan and a per-chip oracle on
the fleet (the paper's Fig. 3), from one FAT run per chip."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from reduce_ops import atomic, compare, execution, names, provenance, reports
from reduce_ops.config import Config, flatten
from reduce_ops.data import load_prepared
from reduce_ops.grouping import fuse, read_groups
from reduce_ops.hardware import FaultMap
from reduce_ops.hardware.stuckfleet import load_stuck
from reduce_ops.models import load_checkpoint
from reduce_ops.progress import Progress
from reduce_ops.stages import plan as plan_stage
from reduce_ops.tracking import stage_run
from reduce_ops.training import resolve_device


def _groups(cfg: Config, fleet: list[FaultMap]) -> list[compare.GroupRun]:
    """The eFAT groups of two or more chips that the group stage formed, with fused maps."""
    maps = {m.chip_id: m for m in fleet}
    out = []
    for row in read_groups(cfg.path("results") / "group" / "groups.csv").itertuples():
        if len(row.members) > 1:
            members = tuple(maps[c] for c in row.members)
            out.append(compare.GroupRun(row.group_id, members,
                                        FaultMap(row.group_id, fuse(members), "fused"),
                                        float(row.planned_epochs)))
    return out


def run(cfg: Config) -> dict[str, Any]:
    """Write results/compare/ (per chip, summary, metrics, Fig. 3); returns the metrics."""
    t0 = time.perf_counter()
    execution.check_address(cfg.execution)
    src = plan_stage.inputs(cfg)
    stats = list(dict.fromkeys([*cfg.compare.statistics, cfg.plan.statistic]))
    plans = {f"reduce-{stat}": plan_stage.plan_for(cfg, src, stat).plan for stat in stats}
    chip_ids = [m.chip_id for m in src.fleet]
    policy_list = compare.policies(cfg.compare.fixed_epochs, plans, chip_ids)
    rule = compare.Rule(src.decision_level, src.constraint_level, cfg.verify.margin,
                        cfg.verify.step, cfg.plan.budget_cap)
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, _ = load_checkpoint(cfg.path("baseline"), device)
    out_dir = cfg.path("results") / "compare"
    with stage_run(cfg.root, "compare", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.set_tags({names.TAG_RESILIENCE_RUN: src.run_id,
                        **provenance.identity_tags(src.identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("compare", "plan", "verify",
                                                                   "constraint", "fat")}))
        stage.log_params({"resilience_run_id": src.run_id, "n_chips": len(chip_ids),
                          "execution.backend": cfg.execution.backend,
                          "execution.workers": cfg.execution.workers,
                          "execution.torch_threads": cfg.execution.torch_threads,
                          "decision_level": src.decision_level,
                          "constraint_level": src.constraint_level})
        with Progress(len(src.fleet), "compare", "chip") as progress:
            stuck = (load_stuck(cfg.path("fleet"), src.fleet)
                     if cfg.hardware.fault_model == "stuck_at" else None)
            per_chip = compare.run_chips(baseline, data, src.fleet, policy_list, rule, cfg.fat,
                                         cfg.hardware, device, progress, stuck, cfg.execution)
        if cfg.group.enabled:
            groups = _groups(cfg, src.fleet)
            with Progress(len(groups), "compare", "eFAT group") as progress:
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
        reports.plot_policy_comparison(per_chip, summary, out_dir / "policies.png",
                                       src.constraint_level)
        metrics = {"decision_level": src.decision_level,
                   "constraint_level": src.constraint_level, "n_chips": len(chip_ids),
                   "stage_seconds": time.perf_counter() - t0,
                   "policies": {r.policy: {k: getattr(r, k) for k in
                                           ("n_shipped", "n_meet_on_test", "meet_rate",
                                            "n_meet_unchecked", "total_epochs",
                                            "epochs_ratio_to_it")}
                                for r in summary.itertuples(index=False)}}
        atomic.write_json(out_dir / "metrics.json", metrics)
        stage.log_artifacts(out_dir)
    lines = [f"  {r.policy:>14}: ships {r.n_shipped:>3}/{r.n_chips}, {r.n_meet_on_test:>3} of them "
             f"meet {src.constraint_level:.4f} on test ({r.n_meet_unchecked} trained chips do), "
             f"{r.total_epochs:g} epochs"
             + (f" ({r.epochs_ratio_to_it:.2f} of {r.cheapest_fixed_as_many})"
                if r.cheapest_fixed_as_many else "")
             for r in summary.itertuples(index=False)]
    print("compare:\n" + "\n".join(lines) + f"\n  -> {out_dir}; MLflow run {stage.run_id}")
    return metrics

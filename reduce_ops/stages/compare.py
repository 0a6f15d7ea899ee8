"""`reduce-ops compare`: fixed-epoch policies vs Reduce on the fleet (the paper's Fig. 3), from
one FAT run per chip."""

from __future__ import annotations

import time
from typing import Any

from reduce_ops import atomic, compare, names, provenance, reports
from reduce_ops.config import Config, flatten
from reduce_ops.data import load_prepared
from reduce_ops.models import load_checkpoint
from reduce_ops.planning import make_plan
from reduce_ops.progress import Progress
from reduce_ops.stages import plan as plan_stage
from reduce_ops.tracking import stage_run
from reduce_ops.training import resolve_device


def run(cfg: Config) -> dict[str, Any]:
    """Write results/compare/ (per chip, summary, metrics, Fig. 3); returns the metrics."""
    t0 = time.perf_counter()
    src = plan_stage.inputs(cfg)
    plans = {f"reduce-{stat}": make_plan(src.trials, src.chips, src.level, stat, cfg.plan.metric,
                                         src.granularity, cfg.plan.safety_margin,
                                         cfg.plan.crossing).plan
             for stat in cfg.compare.statistics}
    chip_ids = [m.chip_id for m in src.fleet]
    policies = compare.policy_epochs(cfg.compare.fixed_epochs, plans, chip_ids)
    amounts = compare.amounts_per_chip(policies)
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, _ = load_checkpoint(cfg.path("baseline"), device)
    out_dir = cfg.path("results") / "compare"
    with stage_run(cfg.root, "compare", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.set_tags({names.TAG_RESILIENCE_RUN: src.run_id,
                        **provenance.identity_tags(src.identity)})
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("compare", "plan", "constraint",
                                                                   "fat")}))
        stage.log_params({"resilience_run_id": src.run_id, "n_chips": len(chip_ids),
                          "constraint_level": src.level})
        with Progress(len(src.fleet), "compare", "chip") as progress:
            curves = compare.run_chips(baseline, data, src.fleet, amounts, cfg.fat, cfg.hardware,
                                       device, progress)
        per_chip = compare.per_chip_table(curves, policies, src.level)
        summary = compare.summarize(per_chip)
        for row in summary.itertuples(index=False):
            stage.child_run(f"policy {row.policy}", {"policy": row.policy},
                            {"n_met": [(0, row.n_met)], "pass_rate": [(0, row.pass_rate)],
                             "n_rejected": [(0, row.n_rejected)],
                             "total_epochs": [(0, row.total_epochs)],
                             "total_seconds": [(0, row.total_seconds)]},
                            {names.TAG_POLICY: row.policy})
        trained = float(sum(max(a) for a in amounts.values()))
        separate = float(summary["total_epochs"].sum())
        atomic.write_csv(per_chip, out_dir / "per_chip.csv")
        atomic.write_csv(summary, out_dir / "summary.csv")
        reports.plot_policy_comparison(per_chip, summary, out_dir / "policies.png", src.level)
        metrics = {"constraint_level": src.level, "n_chips": len(chip_ids),
                   "epochs_trained": trained, "epochs_if_one_run_per_policy": separate,
                   "stage_seconds": time.perf_counter() - t0,
                   "policies": {r.policy: {"n_met": r.n_met, "pass_rate": r.pass_rate,
                                           "total_epochs": r.total_epochs,
                                           "n_rejected": r.n_rejected}
                                for r in summary.itertuples(index=False)}}
        atomic.write_json(out_dir / "metrics.json", metrics)
        stage.log_metrics({"epochs_trained": trained, "epochs_if_one_run_per_policy": separate})
        stage.log_artifacts(out_dir)
    lines = [f"  {r.policy:>14}: {r.n_met:>4}/{r.n_chips} chips meet {src.level:.4f} "
             f"({100 * r.pass_rate:.0f}%), {r.total_epochs:g} epochs, {r.n_rejected} rejected"
             for r in summary.itertuples(index=False)]
    print("compare:\n" + "\n".join(lines) + f"\n  trained {trained:g} epochs instead of "
          f"{separate:g} (one run per chip) -> {out_dir}; MLflow run {stage.run_id}")
    return metrics

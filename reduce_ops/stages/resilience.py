"""`reduce-ops resilience`: Step 1 of Reduce, every (fault rate, repetition) trial as an MLflow
child run, then the trials table, the resilience map and Figs. 2a/2b."""

from __future__ import annotations

import time
from typing import Any

from reduce_ops import atomic, execution, names, provenance, resilience
from reduce_ops.config import Config
from reduce_ops.data import load_prepared
from reduce_ops.models import load_checkpoint
from reduce_ops.needs import resilience_map
from reduce_ops.progress import Progress
from reduce_ops.records import baseline as baseline_record
from reduce_ops.records import trials as trials_record
from reduce_ops.reports.resilience import (
    markdown_summary,
    plot_accuracy_vs_fault_rate,
    plot_retraining_needed,
)
from reduce_ops.shipping import ShippingRule
from reduce_ops.tracking.runs import find_runs, read_children, reap_abandoned, stage_run
from reduce_ops.tracking.store import ensure_store, tracking_uri
from reduce_ops.training import resolve_device


def _reusable(uri: str, grid_hash: str) -> dict[str, trials_record.TrialResult]:
    """Finished trials of interrupted or killed runs with the same grid, baseline and data."""
    reusable: dict[str, trials_record.TrialResult] = {}
    # a run whose process was SIGKILLed (or ran out of memory) is still RUNNING: end it KILLED
    reap_abandoned(uri, {names.TAG_GRID_HASH: grid_hash})
    for old in find_runs(uri, {names.TAG_GRID_HASH: grid_hash}, statuses=("KILLED", "FAILED")):
        for child in read_children(uri, old.run_id, trials_record.TRIAL_METRICS):
            trial = trials_record.from_run(child)
            reusable.setdefault(trial.spec.key, trial)
    return reusable


def run(cfg: Config) -> dict[str, Any]:
    """Write results/resilience/ (trials, map, figures, summary); returns the summary."""
    t0 = time.perf_counter()
    execution.check_address(cfg.execution)
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, ckpt = load_checkpoint(cfg.path("baseline"), device,
                                   cfg.hardware.exclude_layers)
    provenance.Identity(None, ckpt["info"].get("dataset_hash")).require_match(
        provenance.Identity(None, data.dataset_hash), str(cfg.path("baseline")),
        "run `reduce-ops pretrain` again")
    identity = provenance.current_identity(cfg)
    # measured once by pretrain; decided on validation, judged on test: each split's level from
    # the baseline on it
    measured = baseline_record.read(baseline_record.path(cfg.path("results")),
                                    cfg.path("baseline"))
    base_val, base_test = measured.val_accuracy, measured.test_accuracy
    rule = ShippingRule.from_config(cfg, base_val, base_test, len(data.y["val"]),
                                    len(data.y["test"]))
    level, test_level = rule.decision_level, rule.constraint_level
    res = cfg.resilience
    specs = resilience.trial_grid(res)
    # trials go on until they reach what verification will ask of a chip
    bar = rule.ship_level
    target = resilience.TrialTarget(round(bar, 9), cfg.plan.budget_cap, res.confirm_epochs, rule)
    ghash = resilience.grid_hash(res, cfg.fat, cfg.hardware, target, identity.baseline_hash,
                                 identity.dataset_hash)
    uri = tracking_uri(cfg.root)
    ensure_store(uri)
    reusable = _reusable(uri, ghash)

    out_dir = cfg.path("results") / "resilience"
    with stage_run(cfg.root, "resilience", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg), children="resilience trials") as stage:
        stage.set_tags({names.TAG_GRID_HASH: ghash, **provenance.identity_tags(identity)})
        stage.log_params(provenance.measured_params(cfg))
        stage.log_params({"baseline_hash": identity.baseline_hash,
                          "dataset_hash": identity.dataset_hash, "n_trials": len(specs),
                          "checkpoints": resilience.checkpoint_amounts(res),
                          "execution.backend": cfg.execution.backend,
                          "execution.workers": cfg.execution.workers,
                          "execution.torch_threads": cfg.execution.torch_threads,
                          "execution.batch": cfg.execution.batch,
                          "device": str(device)})
        stage.log_metrics({"baseline_test_accuracy": base_test, "baseline_val_accuracy": base_val,
                           "decision_level": level, "constraint_level": test_level})

        def log_trial(result: resilience.TrialResult) -> None:
            params, history, tags = trials_record.run_payload(result)
            stage.child_run(trials_record.run_name(result.spec), params, history, tags,
                            span=trials_record.run_span(result))

        reused = sum(1 for s in specs if s.key in reusable)
        with Progress(len(specs), "resilience", "trial") as progress:
            results = resilience.run_trials(baseline, data, specs, res, cfg.fat, cfg.hardware,
                                            target, device, reusable, log_trial, progress,
                                            cfg.execution)
        trials = trials_record.table(results)
        levels = sorted(set(res.accuracy_levels) | {round(level, 6), round(bar, 6)})
        res_map = resilience_map(trials, levels)
        atomic.write_csv(trials, out_dir / trials_record.FILE)
        atomic.write_csv(res_map, out_dir / "resilience_map.csv")
        grid = trials[trials["amount"] <= res.max_epochs + 1e-9]
        plot_accuracy_vs_fault_rate(grid, out_dir / "accuracy_vs_fault_rate.png",
                                            metric=names.VAL_ACCURACY, baseline=base_val,
                                            constraint=level)
        plot_retraining_needed(res_map, out_dir / "retraining_needed.png",
                                       max_amount=cfg.plan.budget_cap, constraint_level=bar)
        seconds = time.perf_counter() - t0
        n_extended = sum(r.extended for r in results)
        summary = {"n_trials": len(specs), "n_reused": reused, "n_extended": n_extended,
                   "baseline_test_accuracy": base_test, "baseline_val_accuracy": base_val,
                   "decision_level": level, "constraint_level": test_level,
                   "trained_epochs": float(sum(r.amounts[-1] for r in results)),
                   "stage_seconds": seconds,
                   "tracking_seconds": stage.tracking_seconds,
                   "tracking_fraction": stage.tracking_seconds / seconds, "run_id": stage.run_id}
        atomic.write_json(out_dir / "summary.json", summary)
        stage.log_numbers(summary)
        stage.describe(markdown_summary(grid, res_map, level))
        stage.log_artifacts(out_dir)
    print(f"resilience: {len(specs)} trials ({reused} reused from an interrupted run, "
          f"{n_extended} measured past the grid) in {seconds:.0f} s, MLflow logging "
          f"{100 * stage.tracking_seconds / seconds:.1f}% of it; baseline val/test accuracy "
          f"{base_val:.4f}/{base_test:.4f}, decision level {level:.4f} -> {out_dir}; "
          f"MLflow run {stage.run_id}")
    return summary

"""`reduce-ops variants`: train every baseline variant of `variants` (activation threshold x
sharpness method) like the baseline, one MLflow parent run with a child run per variant; writes
paths.variants/<name>.pt and results/variants/ (summary.csv, metrics.json)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from reduce_ops import atomic, execution, provenance
from reduce_ops.baseline import EpochRecord, TrainedBaseline, describe, train_baseline
from reduce_ops.config import Config, VariantConfig, flatten
from reduce_ops.data import load_prepared
from reduce_ops.models import save_checkpoint
from reduce_ops.names import BASELINE_MEASURES, TEST_ACCURACY, VAL_ACCURACY
from reduce_ops.progress import Progress
from reduce_ops.tracking.runs import stage_run
from reduce_ops.training import resolve_device
from reduce_ops.variants import SETTINGS, settings

SUMMARY_COLUMNS = ["variant", *SETTINGS, VAL_ACCURACY, TEST_ACCURACY, "int8_test_accuracy",
                   "activation_sparsity", "flatness_loss_increase", "flatness_loss_increase_std",
                   "best_epoch", "epochs_trained", "train_seconds"]


@dataclass(frozen=True)
class _Inputs:
    """What every variant's worker gets once; the progress bar only with one local worker."""

    cfg: Config
    data: Any
    device: Any
    progress: Progress | None


@dataclass(frozen=True)
class _Trained:
    trained: TrainedBaseline
    history: dict[str, list[tuple[int, float, float]]]   # (epoch, value, when measured)
    span: tuple[float, float]


def _variant_task(shared: _Inputs, variant: VariantConfig) -> _Trained:
    """Train one variant like the baseline (no MLflow: the driver logs it)."""
    progress = shared.progress
    if progress is not None:
        progress.start(variant.name)
    history: dict[str, list[tuple[int, float, float]]] = {
        "train_loss": [], "holdout_accuracy": [], "holdout_loss": []}
    started = time.time()

    def on_epoch(rec: EpochRecord) -> None:
        for key in history:
            history[key].append((rec.epoch, getattr(rec, key), time.time()))
        if progress is not None:
            progress.inside(f"epoch {rec.epoch}, holdout accuracy {rec.holdout_accuracy:.4f}")

    train_cfg = dataclasses.replace(shared.cfg.train, sharpness=variant.sharpness,
                                    rho=variant.rho)
    trained = train_baseline(shared.cfg, shared.data, variant.activation_threshold, train_cfg,
                             shared.device, on_epoch)
    return _Trained(trained, history, (started, time.time()))


def run(cfg: Config) -> dict[str, Any]:
    """Train each variant; returns {variant name: metrics}."""
    t0 = time.perf_counter()
    own = atomic.only_files(*(f"{v.name}.pt" for v in cfg.variants))   # written before markers
    atomic.check_replaceable(cfg.path("variants"), "variants", own)   # before any training
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    out_dir = cfg.path("results") / "variants"
    n_val, n_test = len(data.y["val"]), len(data.y["test"])
    results: dict[str, dict[str, float]] = {}
    with stage_run(cfg.root, "variants", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg), children="variants") as stage, \
            atomic.atomic_dir(cfg.path("variants"), "variants", own) as models_dir:
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("model", "train", "flatness")}))
        stage.log_params({"dataset_hash": data.dataset_hash, "device": str(device),
                          "variants": [v.name for v in cfg.variants]})
        stage.set_tags(provenance.identity_tags(provenance.Identity(None, data.dataset_hash)))
        trained_rows: dict[int, dict[str, Any]] = {}
        with Progress(len(cfg.variants), "variants", "variant") as progress:
            def finished(i: int, out: _Trained) -> None:
                variant, trained, metrics = cfg.variants[i], out.trained, out.trained.metrics
                child = stage.child_run(
                    variant.name, {"variant": variant.name, **settings(variant)},
                    {**out.history, **{k: [(0, v)] for k, v in metrics.items()}},
                    {"reduce_ops.variant": variant.name}, span=out.span)
                info = {"dataset_hash": data.dataset_hash, "variant": variant.name,
                        **settings(variant), TEST_ACCURACY: metrics[TEST_ACCURACY],
                        "best_epoch": trained.result.best_epoch, "run_id": child,
                        **{k: metrics[k] for k in BASELINE_MEASURES}}
                save_checkpoint(trained.model, trained.arch, info,
                                models_dir / f"{variant.name}.pt")
                results[variant.name] = metrics
                trained_rows[i] = {"variant": variant.name, **settings(variant),
                                   **{k: metrics[k] for k in SUMMARY_COLUMNS[4:]}}
                progress.done(variant.name, describe(metrics, n_val, n_test),
                              out.span[1] - out.span[0])

            exe = cfg.execution
            shared = _Inputs(cfg, data, device, None if execution.pooled(exe) else progress)
            if execution.pooled(exe) and cfg.variants:
                progress.start(f"{min(exe.workers, len(cfg.variants))} at once")
            execution.map_unordered(_variant_task, shared, list(cfg.variants), exe, finished)
        rows = [trained_rows[i] for i in range(len(cfg.variants))]
        results = {name: results[name] for name in (v.name for v in cfg.variants)}
        table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
        atomic.write_csv(table, out_dir / "summary.csv")
        atomic.write_json(out_dir / "metrics.json",
                          {name: {k: m[k] for k in SUMMARY_COLUMNS[4:]}
                           for name, m in results.items()})
        stage.log_metrics({"stage_seconds": time.perf_counter() - t0})
        stage.log_artifacts(out_dir)
    print(f"variants: {len(cfg.variants)} baselines trained in {time.perf_counter() - t0:.0f} s "
          f"-> {cfg.path('variants')}; MLflow run {stage.run_id}")
    for row in rows:
        print(f"  {row['variant']}: test {row[TEST_ACCURACY]:.4f} (int8 "
              f"{row['int8_test_accuracy']:.4f}), sparsity {row['activation_sparsity']:.3f}, "
              f"flatness {row['flatness_loss_increase']:.4f}")
    return results

"""`reduce-ops pretrain`: train the baseline until its holdout accuracy plateaus, log one run
(per-epoch curves, accuracies on validation and test, float and int8, activation sparsity and
flatness)."""

from __future__ import annotations

import time

from reduce_ops import provenance
from reduce_ops.baseline import EpochRecord, describe, train_baseline
from reduce_ops.config import Config, flatten
from reduce_ops.data import load_prepared
from reduce_ops.models import save_checkpoint
from reduce_ops.names import BASELINE_MEASURES, TEST_ACCURACY
from reduce_ops.progress import Progress
from reduce_ops.records import baseline as baseline_record
from reduce_ops.tracking.runs import stage_run
from reduce_ops.training import resolve_device


def run(cfg: Config) -> dict[str, float]:
    """Write paths.baseline and results/pretrain/metrics.json; returns the metrics."""
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    with stage_run(cfg.root, "pretrain", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("data", "model", "train",
                                                                 "flatness")}))
        stage.log_params({"dataset_hash": data.dataset_hash, "device": str(device)})
        stage.set_tags(provenance.identity_tags(provenance.Identity(None, data.dataset_hash)))
        with Progress(cfg.train.max_epochs, f"pretrain {cfg.model.name}", "epoch") as progress:
            def on_epoch(rec: EpochRecord) -> None:
                stage.log_metrics({"train_loss": rec.train_loss,
                                   "holdout_accuracy": rec.holdout_accuracy,
                                   "holdout_loss": rec.holdout_loss, "epoch_seconds": rec.seconds},
                                  step=rec.epoch)
                progress.done(f"epoch {rec.epoch}", f"train loss {rec.train_loss:.3f}, "
                              f"holdout accuracy {rec.holdout_accuracy:.4f}")

            trained = train_baseline(cfg, data, cfg.model.activation_threshold, cfg.train,
                                     device, on_epoch)
        model, result, metrics = trained.model, trained.result, trained.metrics
        stage.log_params({"n_parameters": sum(p.numel() for p in model.parameters())})
        n_val, n_test = len(data.y["val"]), len(data.y["test"])
        seconds = time.perf_counter() - t0
        metrics["train_seconds"] = seconds
        stage.log_metrics(metrics)
        arch = trained.arch
        test_acc = metrics[TEST_ACCURACY]
        info = {"dataset_hash": data.dataset_hash, TEST_ACCURACY: test_acc,
                "best_epoch": result.best_epoch, "run_id": stage.run_id,
                "activation_threshold": cfg.model.activation_threshold,
                "sharpness": cfg.train.sharpness, "rho": cfg.train.rho,
                **{k: metrics[k] for k in BASELINE_MEASURES}}
        baseline = cfg.path("baseline")
        save_checkpoint(model, arch, info, baseline)
        metrics_path = cfg.path("results") / "pretrain" / baseline_record.FILE
        baseline_record.write(metrics_path, metrics, baseline, data.dataset_hash, cfg.model.name)
        stage.log_artifact(metrics_path)
    print(f"baseline {cfg.model.name}: {describe(metrics, n_val, n_test)}, after "
          f"{len(result.history)} epochs (best epoch {result.best_epoch}) in {seconds:.1f} s -> "
          f"{baseline}; MLflow run {stage.run_id}")
    return metrics

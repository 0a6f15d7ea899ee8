"""`reduce-ops pretrain`: train the baseline until validation accuracy plateaus, log one run."""

from __future__ import annotations

import time

import torch

from reduce_ops import atomic, binomial, provenance
from reduce_ops.binomial import wilson_interval
from reduce_ops.config import Config, flatten
from reduce_ops.data import load_prepared
from reduce_ops.models import build_model, save_checkpoint
from reduce_ops.names import TEST_ACCURACY, VAL_ACCURACY
from reduce_ops.progress import Progress
from reduce_ops.tracking import stage_run
from reduce_ops.training import EpochRecord, evaluate, pretrain, resolve_device


def run(cfg: Config) -> dict[str, float]:
    """Write paths.baseline and results/pretrain/metrics.json; returns the metrics."""
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    with stage_run(cfg.root, "pretrain", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in ("data", "model", "train")}))
        stage.log_params({"dataset_hash": data.dataset_hash, "n_parameters": n_params,
                          "device": str(device)})
        stage.set_tags(provenance.identity_tags(provenance.Identity(None, data.dataset_hash)))
        with Progress(cfg.train.max_epochs, f"pretrain {cfg.model.name}", "epoch") as progress:
            def on_epoch(rec: EpochRecord) -> None:
                stage.log_metrics({"train_loss": rec.train_loss,
                                   "holdout_accuracy": rec.holdout_accuracy,
                                   "holdout_loss": rec.holdout_loss, "epoch_seconds": rec.seconds},
                                  step=rec.epoch)
                progress.done(f"epoch {rec.epoch}", f"train loss {rec.train_loss:.3f}, "
                              f"holdout accuracy {rec.holdout_accuracy:.4f}")

            result = pretrain(model, data, cfg.train, device, on_epoch)
        # measured once, on splits the training never chose by
        val_acc, val_loss = evaluate(model, data.x["val"], data.y["val"], device=device)
        test_acc, test_loss = evaluate(model, data.x["test"], data.y["test"], device=device)
        n_val, n_test = len(data.y["val"]), len(data.y["test"])
        val_ci = wilson_interval(val_acc, n_val)
        test_ci = wilson_interval(test_acc, n_test)
        seconds = time.perf_counter() - t0
        metrics = {VAL_ACCURACY: val_acc, "val_ci_low": val_ci[0], "val_ci_high": val_ci[1],
                   "val_loss": val_loss, TEST_ACCURACY: test_acc, "test_ci_low": test_ci[0],
                   "test_ci_high": test_ci[1], "test_loss": test_loss,
                   "best_holdout_accuracy": result.best_holdout_accuracy,
                   "n_holdout": result.n_holdout, "best_epoch": result.best_epoch,
                   "epochs_trained": len(result.history), "train_seconds": seconds}
        stage.log_metrics(metrics)
        arch = {"name": cfg.model.name, "input_shape": list(data.input_shape),
                "num_classes": data.num_classes}
        info = {"dataset_hash": data.dataset_hash, TEST_ACCURACY: test_acc,
                "best_epoch": result.best_epoch, "run_id": stage.run_id}
        baseline = cfg.path("baseline")
        save_checkpoint(model, arch, info, baseline)
        metrics_path = cfg.path("results") / "pretrain" / "metrics.json"
        atomic.write_json(metrics_path, {**metrics, "dataset_hash": data.dataset_hash,
                                         "model": cfg.model.name})
        stage.log_artifact(metrics_path)
    print(f"baseline {cfg.model.name}: validation accuracy "
          f"{binomial.fmt(val_acc, n_val)} on {n_val} images, test accuracy "
          f"{binomial.fmt(test_acc, n_test)} on {n_test}, after {len(result.history)} epochs "
          f"(best epoch {result.best_epoch}) in {seconds:.1f} s -> {baseline}; "
          f"MLflow run {stage.run_id}")
    return metrics

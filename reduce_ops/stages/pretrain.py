"""`reduce-ops pretrain`: train the baseline until its holdout accuracy plateaus, log one run
(per-epoch curves, accuracies on validation and test, float and int8, activation sparsity and
flatness)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reduce_ops import atomic, binomial, provenance
from reduce_ops.binomial import wilson_interval
from reduce_ops.config import Config, TrainConfig, flatten
from reduce_ops.data import PreparedData, load_prepared
from reduce_ops.models import activation_sparsity, build_model, save_checkpoint
from reduce_ops.names import TEST_ACCURACY, VAL_ACCURACY
from reduce_ops.progress import Progress
from reduce_ops.robustness import quantized_accuracy
from reduce_ops.sharpness import flatness
from reduce_ops.tracking import stage_run
from reduce_ops.baseline import EpochRecord, PretrainResult, pretrain
from reduce_ops.training import evaluate, resolve_device


# measured on every baseline and kept in its checkpoint's info (robustness reports them)
MEASURES = ("activation_sparsity", "flatness_loss_increase", "int8_test_accuracy")


@dataclass
class TrainedBaseline:
    """A trained baseline (the pipeline's or a variant) and what was measured on it."""

    model: nn.Module
    arch: dict[str, Any]          # build_model arguments, saved with the checkpoint
    result: PretrainResult
    metrics: dict[str, float]


def train_baseline(cfg: Config, data: PreparedData, activation_threshold: float,
                   train_cfg: TrainConfig, device: torch.device,
                   on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainedBaseline:
    """Build and train one baseline, then measure it once, on splits the training never chose
    by: accuracy (float and int8) on validation and test, activation sparsity (validation) and
    flatness (a seeded sample of the training split)."""
    t0 = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes,
                        activation_threshold).to(device)
    result = pretrain(model, data, train_cfg, device, on_epoch, cfg.hardware.layer_types)
    seconds = time.perf_counter() - t0
    val_acc, val_loss = evaluate(model, data.x["val"], data.y["val"], device=device)
    test_acc, test_loss = evaluate(model, data.x["test"], data.y["test"], device=device)
    n_val, n_test = len(data.y["val"]), len(data.y["test"])
    val_ci, test_ci = wilson_interval(val_acc, n_val), wilson_interval(test_acc, n_test)
    model_cpu = model.cpu()
    fl = cfg.flatness
    sample = torch.randperm(len(data.y["train"]), generator=torch.Generator().manual_seed(
        fl.seed))[:fl.n_images]
    metrics = {VAL_ACCURACY: val_acc, "val_ci_low": val_ci[0], "val_ci_high": val_ci[1],
               "val_loss": val_loss, TEST_ACCURACY: test_acc, "test_ci_low": test_ci[0],
               "test_ci_high": test_ci[1], "test_loss": test_loss,
               "int8_val_accuracy": quantized_accuracy(model_cpu, data.x["val"], data.y["val"],
                                                       cfg.hardware.layer_types),
               "int8_test_accuracy": quantized_accuracy(model_cpu, data.x["test"],
                                                        data.y["test"], cfg.hardware.layer_types),
               "activation_sparsity": activation_sparsity(model_cpu, data.x["val"]),
               **flatness(model_cpu, data.x["train"][sample], data.y["train"][sample],
                          fl.sigma, fl.draws, fl.seed),
               "best_holdout_accuracy": result.best_holdout_accuracy,
               "n_holdout": result.n_holdout, "best_epoch": result.best_epoch,
               "epochs_trained": len(result.history), "train_seconds": seconds}
    model.to(device)
    arch = {"name": cfg.model.name, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "activation_threshold": activation_threshold}
    return TrainedBaseline(model, arch, result, metrics)


def describe(metrics: dict[str, float], n_val: int, n_test: int) -> str:
    """The accuracies, sparsity and flatness of one trained baseline, as one clause."""
    return (f"validation accuracy {binomial.fmt(metrics[VAL_ACCURACY], n_val)} on {n_val} "
            f"images, test accuracy {binomial.fmt(metrics[TEST_ACCURACY], n_test)} on {n_test} "
            f"(int8 {metrics['int8_test_accuracy']:.4f}), activation sparsity "
            f"{metrics['activation_sparsity']:.3f}, flatness (loss increase) "
            f"{metrics['flatness_loss_increase']:.4f}")


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
                **{k: metrics[k] for k in MEASURES}}
        baseline = cfg.path("baseline")
        save_checkpoint(model, arch, info, baseline)
        metrics_path = cfg.path("results") / "pretrain" / "metrics.json"
        atomic.write_json(metrics_path, {**metrics, "dataset_hash": data.dataset_hash,
                                         "model": cfg.model.name})
        stage.log_artifact(metrics_path)
    print(f"baseline {cfg.model.name}: {describe(metrics, n_val, n_test)}, after "
          f"{len(result.history)} epochs (best epoch {result.best_epoch}) in {seconds:.1f} s -> "
          f"{baseline}; MLflow run {stage.run_id}")
    return metrics

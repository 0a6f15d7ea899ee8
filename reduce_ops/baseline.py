"""Baseline training (pretrain, variants): plain, SAM or SAQ steps, early stopping on a
stratified holdout of the training split, the best weights kept; then what is measured once on
every baseline."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from reduce_ops import binomial
from reduce_ops.binomial import wilson_interval
from reduce_ops.config import Config, TrainConfig
from reduce_ops.data import PreparedData
from reduce_ops.hardware.mapping import leave_off_array
from reduce_ops.models import activation_sparsity, build_model
from reduce_ops.names import TEST_ACCURACY, VAL_ACCURACY
from reduce_ops.poolfirst import pool_first
from reduce_ops.quant import QuantizedWeights, quantized_accuracy
from reduce_ops.sharpness import SharpnessAware, flatness
from reduce_ops.training import (
    PreparedDataLike,
    batches,
    evaluate,
    make_optimizer,
    random_shift,
    steps_per_epoch,
    train_steps,
)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    holdout_accuracy: float      # on the early-stopping holdout of the training split
    holdout_loss: float
    seconds: float


@dataclass
class PretrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_holdout_accuracy: float = 0.0
    stopped_early: bool = False
    n_holdout: int = 0


def early_stop_split(y: torch.Tensor, fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, holdout) indices of the training split, stratified and seeded: early stopping
    reads the holdout, so the validation split that every later decision reads has not been
    used to pick the baseline (picking the epoch that scores best on a split inflates the
    baseline's accuracy there, and every chip would be judged against that luck)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    fit, holdout = train_test_split(idx, test_size=fraction, random_state=seed,
                                    stratify=y.numpy())
    return torch.from_numpy(np.sort(fit)), torch.from_numpy(np.sort(holdout))


def pretrain(model: nn.Module, data: PreparedDataLike, cfg: TrainConfig,
             device: torch.device | str = "cpu",
             on_epoch: Callable[[EpochRecord], None] | None = None,
             layer_types: Sequence[str] = ("conv", "linear")) -> PretrainResult:
    """Train on the training split less its early-stopping holdout until the holdout's
    accuracy plateaus (patience) or max_epochs; keeps the best weights. The validation split is
    not read.

    cfg.sharpness: 'sam' takes SAM steps of radius cfg.rho; 'saq' trains with the mapped
    weights (`layer_types`) quantized to int8 and takes SAQ steps, and the holdout is read
    through the same quantizer (the model that will be deployed); the float master weights
    are what is kept."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    fit, holdout = early_stop_split(data.y["train"], cfg.early_stop_fraction, cfg.seed)
    x, y = data.x["train"][fit], data.y["train"][fit]
    x_stop, y_stop = data.x["train"][holdout], data.y["train"][holdout]
    stream = batches(len(y), cfg.batch_size, gen)
    optimizer = make_optimizer(model, cfg)
    quantized = QuantizedWeights(model, layer_types) if cfg.sharpness == "saq" else None
    sharpness = (SharpnessAware(model, cfg.rho, quantized) if cfg.sharpness != "none"
                 else None)
    result = PretrainResult(n_holdout=len(holdout))
    fast = pool_first(model)         # the same model to the bit, activations after max-pools
    best_state = copy.deepcopy(model.state_dict())
    best = -1.0
    since_best = 0
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    augment = (lambda xb: random_shift(xb, cfg.augment_shift, aug_gen)) \
        if cfg.augment_shift > 0 else None
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        with quantized if quantized is not None else contextlib.nullcontext():
            loss = train_steps(fast, optimizer, x, y, stream,
                               steps_per_epoch(len(y), cfg.batch_size), device, augment=augment,
                               sharpness=sharpness)
            stop_acc, stop_loss = evaluate(fast, x_stop, y_stop, device=device)
        rec = EpochRecord(epoch, loss, stop_acc, stop_loss, time.perf_counter() - t0)
        result.history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        if stop_acc > best + cfg.min_delta:
            best, since_best = stop_acc, 0
            result.best_epoch, result.best_holdout_accuracy = epoch, stop_acc
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if since_best >= cfg.patience:
                result.stopped_early = True
                break
    model.load_state_dict(best_state)
    return result


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
    """Build and train one baseline (its hardware.exclude_layers off the array), then measure
    it once (measure)."""
    t0 = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes,
                        activation_threshold).to(device)
    leave_off_array(model, cfg.hardware.exclude_layers)
    result = pretrain(model, data, train_cfg, device, on_epoch, cfg.hardware.layer_types)
    seconds = time.perf_counter() - t0
    metrics = {**measure(cfg, model, data, device),
               "best_holdout_accuracy": result.best_holdout_accuracy,
               "n_holdout": result.n_holdout, "best_epoch": result.best_epoch,
               "epochs_trained": len(result.history), "train_seconds": seconds}
    arch = {"name": cfg.model.name, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "activation_threshold": activation_threshold,
            "exclude_layers": list(cfg.hardware.exclude_layers)}
    return TrainedBaseline(model, arch, result, metrics)


def measure(cfg: Config, model: nn.Module, data: PreparedData,
            device: torch.device | str) -> dict[str, float]:
    """What is measured once on every baseline, trained here or given, on splits its training
    never chose by: accuracy (float and int8) on validation and test, activation sparsity
    (validation) and flatness (a seeded sample of the training split)."""
    model.to(device)
    fast = pool_first(model)
    val_acc, val_loss = evaluate(fast, data.x["val"], data.y["val"], device=device)
    test_acc, test_loss = evaluate(fast, data.x["test"], data.y["test"], device=device)
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
                          fl.sigma, fl.draws, fl.seed)}
    model.to(device)
    return metrics


def describe(metrics: dict[str, float], n_val: int, n_test: int) -> str:
    """The accuracies, sparsity and flatness of one trained baseline, as one clause."""
    return (f"validation accuracy {binomial.fmt(metrics[VAL_ACCURACY], n_val)} on {n_val} "
            f"images, test accuracy {binomial.fmt(metrics[TEST_ACCURACY], n_test)} on {n_test} "
            f"(int8 {metrics['int8_test_accuracy']:.4f}), activation sparsity "
            f"{metrics['activation_sparsity']:.3f}, flatness (loss increase) "
            f"{metrics['flatness_loss_increase']:.4f}")

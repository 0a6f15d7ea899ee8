"""`reduce-ops pretrain`: the baseline. A zoo model is trained until its holdout accuracy
plateaus; a user's trained model (model.source mlflow | python) is loaded and only measured.
Either way one run logs its measures (accuracies on validation and test, float and int8,
activation sparsity, flatness) and the baseline as served: raw images in, normalised inside."""

from __future__ import annotations

import copy
import time
from typing import Any

from torch import nn

from reduce_ops import provenance
from reduce_ops.baseline import EpochRecord, describe, measure, train_baseline
from reduce_ops.config import Config, flatten
from reduce_ops.data import PreparedData, load_prepared
from reduce_ops.hardware.mapping import leave_off_array, mapped_layers, unmapped_layers
from reduce_ops.models import Preprocess, build_model, save_checkpoint, serving_requirements
from reduce_ops.names import BASELINE_MEASURES, TEST_ACCURACY
from reduce_ops.progress import Progress
from reduce_ops.records import baseline as baseline_record
from reduce_ops.tracking.models import log_stage_model
from reduce_ops.tracking.runs import StageRun, stage_run
from reduce_ops.training import resolve_device


def _array_mapping(cfg: Config, model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The one line that says which layers run on the array and which do not (listed once, at
    the start of the pipeline), and the same as run params."""
    hw = cfg.hardware
    mapped = mapped_layers(model, hw.layer_types)
    off = unmapped_layers(model, hw.layer_types)
    n_weights = sum(m.weight.numel() for m in mapped.values())
    line = (f"array mapping: {len(mapped)} layers on the {hw.rows}x{hw.cols} array "
            f"({n_weights} weights)")
    if off:
        line += "; off the array, never masked: " + ", ".join(f"{n} ({why})"
                                                               for n, why in off.items())
    return line, {"array.mapped_layers": len(mapped), "array.mapped_weights": n_weights,
                  "array.off_layers": ", ".join(off) or "none"}


def _log_served(stage: StageRun, model: nn.Module, data: PreparedData) -> None:
    """The baseline as a client uses it (MLflow model `model` of the run): raw uint8 images in,
    normalised inside, in eval mode."""
    pre = Preprocess.from_meta(data.meta)
    served = pre.wrap(copy.deepcopy(model).cpu())
    log_stage_model(stage, served, pre.raw(data.x["test"][:2]).numpy(), serving_requirements(),
                    f"The baseline model (artifact `model`). {pre.describe()}")


def run(cfg: Config) -> dict[str, float]:
    """Write paths.baseline and results/pretrain/metrics.json; returns the metrics."""
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    # everything a user gave is loaded and checked before anything is written
    if cfg.model.source == "zoo":
        given = None
        probe = build_model(cfg.model.name, data.input_shape, data.num_classes)
        leave_off_array(probe, cfg.hardware.exclude_layers)
    else:
        from reduce_ops.model_source import check_fits_data, load_given

        given = load_given(cfg)
        leave_off_array(given.model, cfg.hardware.exclude_layers)
        check_fits_data(given, data.x["val"], data.num_classes)
        probe = given.model
    mapping, mapping_params = _array_mapping(cfg, probe)
    print(mapping, flush=True)
    label = cfg.model.name if given is None else given.label
    sections = ("data", "model", "train", "flatness") if given is None else \
        ("data", "model", "flatness")
    with stage_run(cfg.root, "pretrain", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.log_params(flatten({k: cfg.to_dict()[k] for k in sections}))
        stage.log_params({"dataset_hash": data.dataset_hash, "device": str(device),
                          "baseline": label, **mapping_params})
        stage.set_tags(provenance.identity_tags(provenance.Identity(None, data.dataset_hash)))
        if given is None:
            with Progress(cfg.train.max_epochs, f"pretrain {cfg.model.name}",
                          "epoch") as progress:
                def on_epoch(rec: EpochRecord) -> None:
                    stage.log_metrics({"train_loss": rec.train_loss,
                                       "holdout_accuracy": rec.holdout_accuracy,
                                       "holdout_loss": rec.holdout_loss,
                                       "epoch_seconds": rec.seconds}, step=rec.epoch)
                    progress.done(f"epoch {rec.epoch}", f"train loss {rec.train_loss:.3f}, "
                                  f"holdout accuracy {rec.holdout_accuracy:.4f}")

                trained = train_baseline(cfg, data, cfg.model.activation_threshold, cfg.train,
                                         device, on_epoch)
            model, metrics, arch = trained.model, trained.metrics, trained.arch
            how = {"best_epoch": trained.result.best_epoch,
                   "sharpness": cfg.train.sharpness, "rho": cfg.train.rho}
            done = (f"after {len(trained.result.history)} epochs (best epoch "
                    f"{trained.result.best_epoch})")
        else:
            model = given.model.to(device)
            metrics = measure(cfg, model, data, device)
            arch = {**given.arch, "input_shape": list(data.input_shape),
                    "num_classes": data.num_classes,
                    "exclude_layers": list(cfg.hardware.exclude_layers)}
            how = {"best_epoch": 0, "sharpness": "none", "rho": 0.0, "given": given.label}
            done = "(given, not trained)"
        stage.log_params({"n_parameters": sum(p.numel() for p in model.parameters())})
        n_val, n_test = len(data.y["val"]), len(data.y["test"])
        seconds = time.perf_counter() - t0
        metrics["train_seconds"] = seconds
        stage.log_metrics(metrics)
        info = {"dataset_hash": data.dataset_hash, TEST_ACCURACY: metrics[TEST_ACCURACY],
                "run_id": stage.run_id, "activation_threshold": cfg.model.activation_threshold,
                **how, **{k: metrics[k] for k in BASELINE_MEASURES}}
        _log_served(stage, model, data)
        baseline = cfg.path("baseline")
        save_checkpoint(model, arch, info, baseline)
        metrics_path = cfg.path("results") / "pretrain" / baseline_record.FILE
        baseline_record.write(metrics_path, metrics, baseline, data.dataset_hash, label)
        stage.log_artifact(metrics_path)
    print(f"baseline {label}: {describe(metrics, n_val, n_test)}, {done} in {seconds:.1f} s -> "
          f"{baseline}; MLflow run {stage.run_id}")
    return metrics

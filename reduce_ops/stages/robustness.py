"""`reduce-ops robustness`: accuracy of the int8 baseline and of every trained variant
(`reduce-ops variants`) over bit error rates x fault models x repetitions, under the same faults,
each (variant, trial) an MLflow child run; tables and a figure with one curve per variant."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from reduce_ops import atomic, binomial, provenance, robustness
from reduce_ops.config import Config, flatten
from reduce_ops.data import load_prepared
from reduce_ops.errors import DataError
from reduce_ops.hardware.stuckfleet import POLARITY
from reduce_ops.models import load_checkpoint
from reduce_ops.progress import Progress
from reduce_ops.quant import quantized_accuracy
from reduce_ops.reports.robustness import plot_robustness
from reduce_ops.tracking.runs import stage_run
from reduce_ops.training import evaluate, resolve_device
from reduce_ops.variants import describe_variant, load_variants


def run(cfg: Config) -> dict[str, Any]:
    """Write results/robustness/ (trials, summary, figure, summary.json); returns the summary."""
    t0 = time.perf_counter()
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, ckpt = load_checkpoint(cfg.path("baseline"), device,
                                   cfg.hardware.exclude_layers)
    if ckpt["info"].get("dataset_hash") != data.dataset_hash:
        raise DataError(f"{cfg.path('baseline')}: trained on another prepared dataset; run "
                        f"`reduce-ops pretrain` again")
    models = {"baseline": (baseline, ckpt["info"]),
              **load_variants(cfg, data.dataset_hash, device)}
    rb = cfg.robustness
    specs = robustness.trial_grid(rb.fault_models, rb.bers, rb.repetitions, rb.seed)
    x, y = data.x["test"], data.y["test"]          # a verdict, not a decision: the test split
    layer_types = cfg.hardware.layer_types
    clean = pd.DataFrame([{"variant": name, **describe_variant(info),
                           "float_accuracy": evaluate(model, x, y, device=device)[0],
                           "int8_accuracy": quantized_accuracy(model, x, y,
                                                                          layer_types)}
                          for name, (model, info) in models.items()])
    float_acc, int8_acc = (float(clean.loc[0, "float_accuracy"]),
                           float(clean.loc[0, "int8_accuracy"]))
    out_dir = cfg.path("results") / "robustness"
    with stage_run(cfg.root, "robustness", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg), children="bit-fault trials") as stage:
        stage.log_params(flatten({"robustness": cfg.to_dict()["robustness"]}))
        stage.log_params({"n_trials": len(specs), "layer_types": layer_types,
                          "split": "test", "variants": list(models)})
        stage.log_metrics({"float_accuracy": float_acc, "int8_accuracy": int8_acc,
                           **{f"{r.variant}.{k}": getattr(r, k)
                              for r in clean.iloc[1:].itertuples(index=False)
                              for k in ("float_accuracy", "int8_accuracy")}})

        def log_trial(variant: str, spec: robustness.TrialSpec, accuracy: float,
                      faulty_bits: int, span: tuple[float, float] | None = None) -> None:
            stage.child_run(f"{variant} {spec.key}",
                            {"variant": variant, "fault_model": spec.fault_model,
                             "ber": spec.ber, "repetition": spec.repetition, "seed": spec.seed},
                            {"accuracy": [(0, accuracy)], "faulty_bits": [(0, faulty_bits)],
                             "ber": [(0, spec.ber)]},
                            {"reduce_ops.variant": variant}, span=span)

        with Progress(len(specs), "robustness", "trial") as progress:
            trials = robustness.run_trials({name: m for name, (m, _) in models.items()}, x, y,
                                           specs, layer_types, POLARITY[cfg.hardware.stuck_at.polarity],
                                           cfg.hardware.stuck_at.bits, log_trial, progress,
                                           cfg.execution)
        table = robustness.summarize(trials)
        by_variant = robustness.variant_table(clean, table)
        atomic.write_csv(trials, out_dir / "trials.csv")
        atomic.write_csv(table, out_dir / "summary.csv")
        atomic.write_csv(by_variant, out_dir / "variants.csv")
        plot_robustness(table, out_dir / "accuracy_vs_ber.png",
                                dict(zip(clean["variant"], clean["int8_accuracy"])))
        summary = {"run_id": stage.run_id, "float_accuracy": float_acc,
                   "int8_accuracy": int8_acc, "n_test": len(y), "n_trials": len(specs),
                   "variants": list(models),
                   "stage_seconds": time.perf_counter() - t0,
                   "tracking_seconds": stage.tracking_seconds,
                   "accuracy": {f"{r.variant}:{r.fault_model}@{r.ber:g}": r.mean
                                for r in table.itertuples(index=False)}}
        atomic.write_json(out_dir / "summary.json", summary)
        stage.log_numbers(summary)
        stage.log_artifacts(out_dir)
    print(f"robustness: baseline test accuracy {binomial.fmt(float_acc, len(y))} float, "
          f"{int8_acc:.4f} int8; {len(specs)} fault trials x {len(models)} models in "
          f"{summary['stage_seconds']:.0f} s -> {out_dir}; MLflow run {stage.run_id}")
    print(robustness.format_variant_table(by_variant))
    return summary

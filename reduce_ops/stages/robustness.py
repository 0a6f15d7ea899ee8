"""`reduce-ops robustness`: accuracy of the int8 baseline over bit error rates x fault models x
repetitions, each trial an MLflow child run; a table and Fig. accuracy vs BER."""

from __future__ import annotations

import time
from typing import Any

from reduce_ops import atomic, binomial, provenance, reports, robustness
from reduce_ops.config import Config, flatten
from reduce_ops.data import load_prepared
from reduce_ops.hardware.stuckfleet import POLARITY
from reduce_ops.models import load_checkpoint
from reduce_ops.progress import Progress
from reduce_ops.tracking import stage_run
from reduce_ops.training import evaluate, resolve_device


def run(cfg: Config) -> dict[str, Any]:
    """Write results/robustness/ (trials, summary, figure, summary.json); returns the summary."""
    t0 = time.perf_counter()
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, _ = load_checkpoint(cfg.path("baseline"), device)
    rb = cfg.robustness
    specs = robustness.trial_grid(rb.fault_models, rb.bers, rb.repetitions, rb.seed)
    x, y = data.x["test"], data.y["test"]          # a verdict, not a decision: the test split
    layer_types = cfg.hardware.layer_types
    float_acc = evaluate(baseline, x, y, device=device)[0]
    int8_acc = robustness.quantized_accuracy(baseline, x, y, layer_types)
    out_dir = cfg.path("results") / "robustness"
    with stage_run(cfg.root, "robustness", cfg.tracking.experiment,
                   provenance.dataset_ref(cfg)) as stage:
        stage.log_params(flatten({"robustness": cfg.to_dict()["robustness"]}))
        stage.log_params({"n_trials": len(specs), "layer_types": layer_types,
                          "split": "test"})
        stage.log_metrics({"float_accuracy": float_acc, "int8_accuracy": int8_acc})

        def log_trial(variant: str, spec: robustness.TrialSpec, accuracy: float,
                      faulty_bits: int) -> None:
            stage.child_run(f"{variant} {spec.key}",
                            {"variant": variant, "fault_model": spec.fault_model,
                             "ber": spec.ber, "repetition": spec.repetition, "seed": spec.seed},
                            {"accuracy": [(0, accuracy)], "faulty_bits": [(0, faulty_bits)]},
                            {"reduce_ops.variant": variant})

        with Progress(len(specs), "robustness", "trial") as progress:
            trials = robustness.run_trials({"baseline": baseline}, x, y, specs, layer_types,
                                           POLARITY[rb.stuck_polarity], rb.stuck_bits,
                                           log_trial, progress)
        table = robustness.summarize(trials)
        atomic.write_csv(trials, out_dir / "trials.csv")
        atomic.write_csv(table, out_dir / "summary.csv")
        reports.plot_robustness(table, out_dir / "accuracy_vs_ber.png",
                                {"baseline": int8_acc})
        summary = {"run_id": stage.run_id, "float_accuracy": float_acc,
                   "int8_accuracy": int8_acc, "n_test": len(y), "n_trials": len(specs),
                   "stage_seconds": time.perf_counter() - t0,
                   "tracking_seconds": stage.tracking_seconds,
                   "accuracy": {f"{r.fault_model}@{r.ber:g}": r.mean
                                for r in table.itertuples(index=False)}}
        atomic.write_json(out_dir / "summary.json", summary)
        stage.log_numbers(summary)
        stage.log_artifacts(out_dir)
    worst = table.loc[table["ber"] == table["ber"].max()]
    print(f"robustness: baseline test accuracy {binomial.fmt(float_acc, len(y))} float, "
          f"{int8_acc:.4f} int8; {len(specs)} fault trials, at BER {table['ber'].max():g}: "
          + ", ".join(f"{r.fault_model} {r.mean:.4f} [{r.min:.4f}, {r.max:.4f}]"
                      for r in worst.itertuples(index=False))
          + f" in {summary['stage_seconds']:.0f} s -> {out_dir}; MLflow run {stage.run_id}")
    return summary

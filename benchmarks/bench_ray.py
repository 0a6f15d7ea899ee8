"""Resilience trials on Ray: 2 workers vs 1 at one torch thread each, on the project's prepared
data and baseline (run `reduce-ops prepare` and `pretrain` first). Goal: >= 1.6x on 2 cores.

    .venv/bin/python benchmarks/bench_ray.py [--trials 16] [--epochs 4]

Each configuration runs the same trials (fault rate 0.2, repetitions 0..N-1, FAT for --epochs
epochs, validation and test accuracy at every quarter epoch) from a fresh Ray instance, whose
start is timed apart. Also printed: the driver's cost per trial (wall time not covered by the
workers' trial seconds) and one trial's MLflow logging (a child run with its metric histories)
against a SQLite store, which is what the tracking server adds per trial. Prints one JSON line.

Measured on this 2-core machine, otherwise idle (16 trials of 4 epochs, LeNet/MNIST): 1 worker
39.2 s, 2 workers 22.9 s = 1.71x, identical results; Ray's start 2-3 s; driver 0.14 s per trial
(mostly the workers' own start, paid once); logging one trial 12 ms. On a cluster trials scale
with workers until the driver's per-trial work (~0.15 s) or the server's (~0.01 s per trial's
child run) is the bottleneck: hundreds of workers for trials of seconds, more for longer ones.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import sqlite_store

from reduce_ops import resilience
from reduce_ops.config import ExecutionConfig, load_config
from reduce_ops.data import load_prepared
from reduce_ops.models import load_checkpoint
from reduce_ops.records import trials as trials_record
from reduce_ops.tracking.runs import stage_run

GOAL_RATIO = 1.6


def run(cfg, baseline, data, specs, exe: ExecutionConfig) -> dict:  # noqa: ANN001
    import ray

    res = cfg.resilience
    target = resilience.TrialTarget(0.0, res.max_epochs, 0.0)   # no extension past the grid
    t0 = time.perf_counter()
    if exe.backend == "ray":
        ray.init(num_cpus=exe.workers, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 2**20, configure_logging=False)
    started = time.perf_counter()
    results = resilience.run_trials(baseline, data, specs, res, cfg.fat, cfg.hardware, target,
                                    "cpu", {}, exe=exe)
    wall = time.perf_counter() - started
    if exe.backend == "ray":
        ray.shutdown()
    compute = sum(r.seconds for r in results)
    return {"start_s": started - t0, "wall_s": wall, "trial_s_mean": compute / len(results),
            "driver_s_per_trial": max(0.0, wall - compute / exe.workers) / len(results),
            "results": results}


def logging_cost(results: list[trials_record.TrialResult], repeats: int = 20) -> float:
    """Seconds to log one trial as a child run (the driver's only MLflow work per trial)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = sqlite_store(Path(tmp))
        with stage_run(Path(tmp), "bench", "bench") as stage:
            params, history, tags = trials_record.run_payload(results[0])
            t0 = time.perf_counter()
            for _ in range(repeats):
                stage.child_run("trial", params, history, tags)
            return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=4.0)   # the default grid's trials
    args = parser.parse_args()
    cfg = load_config(args.params, ["resilience.fault_rates=[0.2]",
                                    f"resilience.repetitions={args.trials}",
                                    f"resilience.max_epochs={args.epochs}",
                                    "resilience.checkpoint_every=0.25"])
    data = load_prepared(cfg.path("prepared"))
    baseline, _ = load_checkpoint(cfg.path("baseline"), "cpu")
    specs = resilience.trial_grid(cfg.resilience)
    one = run(cfg, baseline, data, specs, ExecutionConfig("ray", None, 1, 1))
    two = run(cfg, baseline, data, specs, ExecutionConfig("ray", None, 2, 1))
    same = all(a.val_accuracy == b.val_accuracy and a.test_accuracy == b.test_accuracy
               for a, b in zip(one["results"], two["results"]))
    ratio = one["wall_s"] / two["wall_s"]
    log_s = logging_cost(two["results"])
    out = {"trials": len(specs), "epochs_per_trial": args.epochs,
           **{f"workers1_{k}": round(v, 3) for k, v in one.items() if k != "results"},
           **{f"workers2_{k}": round(v, 3) for k, v in two.items() if k != "results"},
           "speedup_2_vs_1": round(ratio, 3), "goal": GOAL_RATIO, "met": ratio >= GOAL_RATIO,
           "identical_results": same, "mlflow_log_s_per_trial": round(log_s, 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

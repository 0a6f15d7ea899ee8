"""`reduce-ops main`: the whole pipeline in one MLflow run, each step a child run beneath it
(no caching: `dvc repro` is the cached way)."""

from __future__ import annotations

import time

from reduce_ops.config import Config
from reduce_ops.stages import PIPELINE, runner
from reduce_ops.tracking.runs import stage_run


def run(cfg: Config) -> None:
    """Run every stage of PIPELINE in order under one parent run."""
    t0 = time.perf_counter()
    with stage_run(cfg.root, "main", cfg.tracking.experiment) as stage:
        stage.log_params({"steps": ",".join(PIPELINE), "params_file": cfg.source})
        for step in PIPELINE:
            print(f"== {step}", flush=True)
            runner(step)(cfg)
        stage.log_metrics({"pipeline_seconds": time.perf_counter() - t0})
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s; MLflow run {stage.run_id}")

"""Several pipelines at once against one team tracking server (PostgreSQL + mlflow server, started
here on loopback): counts the runs and model versions each pipeline says it wrote and those the
server holds. Goal: 0 lost, 0 duplicated.

    .venv/bin/python benchmarks/bench_concurrent.py [--pipelines 4]

Each pipeline is `reduce-ops main` on small settings (digits, 16 chips) in its own copy of the
project, all with the same registry prefix, so their chips' versions land on the same registered
models at the same time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from common import copy_project, run_checked, stage_command, stage_env, write_params

from reduce_ops import teamserver

SMALL = ["data.source=digits", "train.max_epochs=6", "hardware.rows=16", "hardware.cols=16",
         "faultmaps.n_chips=16", "resilience.fault_rates=[0.0, 0.2, 0.4]",
         "resilience.repetitions=2", "resilience.max_epochs=1", "plan.budget_cap=2",
         "constraint.kind=drop", "constraint.value=0.05", "compare.fixed_epochs=[0.5, 1]",
         "robustness.bers=[1.0e-3]", "robustness.repetitions=1", "variants=[]",
         "execution.torch_threads=1"]


def pipeline(root: Path, seed: int, uri: str) -> dict:
    copy_project(root)
    write_params(root, [*SMALL, f"train.seed={seed}"])
    run_checked(stage_command(root, "main"), stage_env(root, uri), f"pipeline {seed}", cwd=root)
    res = root / "results"
    chips = pd.read_csv(res / "fat/chips.csv")
    runs = {stage: json.loads((res / stage / "summary.json").read_text())["run_id"]
            for stage in ("resilience", "fat")}
    return {"runs": runs,
            "n_trials": json.loads((res / "resilience/summary.json").read_text())["n_trials"],
            # version numbers as the registry spells them (pandas reads a column with gaps as
            # floats: 3.0)
            "versions": {c: str(int(v)) for c, v in zip(chips.chip_id, chips.model_version)
                         if pd.notna(v) and str(v) != ""}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=4)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="reduce-ops-bench-server-"))
    folder.chmod(0o755)
    try:
        with teamserver.team_server(folder, teamserver.free_port(),
                                    teamserver.free_port()) as uri:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp, \
                    ThreadPoolExecutor(args.pipelines) as pool:
                roots = [Path(tmp) / f"p{i}" for i in range(args.pipelines)]
                for r in roots:
                    r.mkdir()
                outs = list(pool.map(pipeline, roots, range(args.pipelines),
                                     [uri] * args.pipelines))
            seconds = time.perf_counter() - t0
            client = MlflowClient(uri)
            lost_runs = lost_children = 0
            for out in outs:
                for run_id in out["runs"].values():
                    if client.get_run(run_id).info.status != "FINISHED":
                        lost_runs += 1
                # the trials are in an experiment of their own beside the stage runs'
                every = [e.experiment_id for e in client.search_experiments()]
                kids = client.search_runs(every, "tags.`mlflow.parentRunId` = "
                                                 f"'{out['runs']['resilience']}'")
                lost_children += out["n_trials"] - len(kids)
            expected: dict[str, list[str]] = {}
            for out in outs:
                for chip, version in out["versions"].items():
                    expected.setdefault(chip, []).append(version)
            lost_versions = duplicated = 0
            for chip, said in expected.items():
                held = [mv.version for mv in client.search_model_versions(
                    f"name = 'reduce-ops-{chip}'")]
                lost_versions += len(set(said) - set(held))
                duplicated += len(held) - len(set(held)) + max(0, len(held) - len(said))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"pipelines": args.pipelines, "seconds": round(seconds, 1),
                      "stage_runs": 2 * len(outs), "trial_runs": sum(o["n_trials"] for o in outs),
                      "model_versions": sum(len(o["versions"]) for o in outs),
                      "lost_runs": lost_runs, "lost_trial_runs": lost_children,
                      "lost_versions": lost_versions, "duplicated_versions": duplicated}))


if __name__ == "__main__":
    main()

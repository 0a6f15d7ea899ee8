"""SIGKILL a stage at random moments, then rerun it: counts what was lost or duplicated and
compares the final outputs with those of a run that was never killed. Goal: 0 lost, 0
duplicated, the same outputs.

    .venv/bin/python benchmarks/bench_sigkill.py [--kills 5] [--seed 0] [--stages resilience fat]

For each stage: a small project (the default data, 32 chips, 24 trials) is made up to the stage;
one copy runs the stage once (the reference); then `--kills` times, a fresh copy starts the
stage, SIGKILLs it (and with it the process that logs fat's models) after a random delay in
[0.1, 0.95] of the reference's duration, and runs it again to the end. Lost: a trial or chip missing
from the final outputs or from MLflow. Duplicated: a trial logged twice in the final run, or a
chip with more than one model version for the plan. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from common import copy_project, run_checked, stage_command, stage_env, write_params

from reduce_ops import names
from reduce_ops.config import read_yaml
from reduce_ops.tracking.registry import find_model_versions, model_versions_with_tag
from reduce_ops.tracking.runs import find_runs, read_children
from reduce_ops.tracking.store import tracking_uri

SMALL = ["train.max_epochs=4", "hardware.rows=16", "hardware.cols=16",
         "faultmaps.n_chips=32", "resilience.fault_rates=[0.0, 0.1, 0.2, 0.3]",
         "resilience.repetitions=6", "resilience.max_epochs=2", "plan.budget_cap=3",
         "constraint.kind=drop", "constraint.value=0.05", "variants=[]"]
BEFORE = {"resilience": ["prepare", "pretrain", "faultmaps"],
          "fat": ["prepare", "pretrain", "faultmaps", "resilience", "plan", "group"]}
CHIP_COLUMNS = ["chip_id", "status", "actual_epochs", "val_accuracy", "test_accuracy",
                "planned_epochs", "n_checks", "meets_on_test"]


def _run(root: Path, stage: str) -> float:
    return run_checked(stage_command(root, stage), stage_env(root), f"{root}: {stage}", cwd=root)


def _killed_run(root: Path, stage: str, delay: float) -> bool:
    """Start the stage, SIGKILL it after `delay` seconds; False when it had finished before."""
    proc = subprocess.Popen(stage_command(root, stage), cwd=root, env=stage_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _done_so_far(root: Path, stage: str) -> int:
    """Trials finished in any resilience run, or chips with a model version for the plan."""
    uri = tracking_uri(root)
    if stage == "resilience":
        keys = set()
        for run in find_runs(uri, {names.TAG_STAGE: "resilience"}):
            keys |= {(c["params"]["fault_rate"], c["params"]["repetition"])
                     for c in read_children(uri, run.run_id, ["val_accuracy"])}
        return len(keys)
    plan_id = json.loads((root / "results/plan/summary.json").read_text())["run_id"]
    return len(model_versions_with_tag(uri, names.VTAG_PLAN_RUN, plan_id))


def _resilience_counts(root: Path, ref: Path) -> dict:
    uri = tracking_uri(root)
    summary = json.loads((root / "results/resilience/summary.json").read_text())
    children = read_children(uri, summary["run_id"], ["val_accuracy"])
    keys = Counter((c["params"]["fault_rate"], c["params"]["repetition"]) for c in children)
    trials = pd.read_csv(root / "results/resilience/trials.csv")
    expected = summary["n_trials"]
    return {"n_trials": expected, "reused": summary["n_reused"],
            "lost": expected - len(keys) + max(0, expected - len(trials)),
            "duplicated": sum(n - 1 for n in keys.values()),
            "same_outputs": ((root / "results/resilience/trials.csv").read_bytes()
                             == (ref / "results/resilience/trials.csv").read_bytes())}


def _fat_counts(root: Path, ref: Path) -> dict:
    uri = tracking_uri(root)
    plan = pd.read_csv(root / "results/plan/plan.csv", dtype={"chip_id": str})
    plan_id = json.loads((root / "results/plan/summary.json").read_text())["run_id"]
    prefix = read_yaml(root / "params.yaml")["registry"]["prefix"]
    feasible = plan.loc[plan["feasible"].astype(str).str.lower() == "true", "chip_id"]
    per_chip = {c: len(find_model_versions(uri, names.registered_name(prefix, c),
                                                    {names.VTAG_PLAN_RUN: plan_id}))
                for c in feasible}
    chips = pd.read_csv(root / "results/fat/chips.csv", dtype={"chip_id": str})
    want = pd.read_csv(ref / "results/fat/chips.csv", dtype={"chip_id": str})
    return {"n_chips": len(plan), "n_feasible": len(feasible),
            "reused": int((~chips["trained"].astype(bool) & chips["model_version"].notna()).sum()),
            "lost": sum(n == 0 for n in per_chip.values()) + len(set(plan.chip_id)
                                                                - set(chips.chip_id)),
            "duplicated": sum(n - 1 for n in per_chip.values() if n > 1),
            "same_outputs": chips[CHIP_COLUMNS].equals(want[CHIP_COLUMNS])}


def bench(stage: str, kills: int, rng: random.Random, tmp: Path) -> dict:
    base = tmp / stage / "base"
    base.mkdir(parents=True)
    copy_project(base)
    write_params(base, SMALL)
    for before in BEFORE[stage]:
        _run(base, before)
    ref = tmp / stage / "ref"
    shutil.copytree(base, ref)
    duration = _run(ref, stage)
    rounds = []
    for k in range(kills):
        work = tmp / stage / f"kill{k}"
        shutil.copytree(base, work)
        delay = round(rng.uniform(0.1, 0.95) * duration, 2)
        landed = _killed_run(work, stage, delay)
        done = _done_so_far(work, stage)
        t0 = time.perf_counter()
        _run(work, stage)
        rerun = time.perf_counter() - t0
        counts = (_resilience_counts if stage == "resilience" else _fat_counts)(work, ref)
        rounds.append({"kill_after_s": delay, "killed_mid_stage": landed,
                       "done_when_killed": done, "rerun_seconds": round(rerun, 1), **counts})
        shutil.rmtree(work)
    return {"stage": stage, "reference_seconds": round(duration, 1),
            "total_lost": sum(r["lost"] for r in rounds),
            "total_duplicated": sum(r["duplicated"] for r in rounds),
            "all_same_outputs": all(r["same_outputs"] for r in rounds), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=["resilience", "fat"],
                        choices=sorted(BEFORE))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="reduce-ops-bench-sigkill-") as tmp:
        results = [bench(stage, args.kills, rng, Path(tmp)) for stage in args.stages]
    print(json.dumps({"kills_per_stage": args.kills, "seed": args.seed, "stages": results}))


if __name__ == "__main__":
    main()

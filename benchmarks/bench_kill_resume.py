"""SIGKILL `plan`, `group`, `fat` and the creation of a new MLflow store at random moments, look
at what the kill left, then run again: counts what was lost, duplicated or mixed. Goal: all 0.

    .venv/bin/python benchmarks/bench_kill_resume.py [--kills 10] [--seed 0] [--chips 8]
        [--stages plan group fat store]

A small project (digits, a 16x16 array, `--chips` chips) is made up to `group` once;
for each stage a copy runs it once more as the reference (its duration sets the kill window).
Then `--kills` times, a fresh copy starts the stage, SIGKILLs it after a random delay in
[0.05, 1.0] of the reference's duration, checks what is on disk and in MLflow, and runs the
stage again to its end. For `store`, a fresh folder's `mlflow.db` is being created (the
migrations) when the kill lands; "again" opens it the way every stage does.

Counted per kill (right after it, and after the rerun):
  lost        an output that was whole before the kill and is gone or unreadable after it
              (the old plan, groups or chip record; a store that no longer opens), a chip
              without its model version for the plan after the rerun;
  duplicated  a chip with more than one version for the plan (and model key) after the rerun;
  mixed       a record whose files are neither all the old ones nor all of one new write (a
              reader would hand on rows under the wrong run id), a champion on a version that
              was not verified, a half-made store under the store's own name.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import copy_project, run_checked, stage_command, stage_env, write_params

from reduce_ops import names
from reduce_ops.config import read_yaml
from reduce_ops.records import sets
from reduce_ops.tracking.registry import find_model_versions

SMALL = ["data.source=digits", "train.max_epochs=3", "train.device=cpu", "hardware.rows=16",
         "hardware.cols=16", "resilience.fault_rates=[0.0, 0.1, 0.2, 0.3]",
         "resilience.repetitions=2", "resilience.max_epochs=0.5",
         "resilience.checkpoint_every=0.25", "plan.budget_cap=1.0", "plan.min_reached=0.5",
         "fat.lr=0.01", "constraint.kind=drop", "constraint.value=0.1",
         "faultmaps.rate_max=0.3", "variants=[]"]
SETUP = ["prepare", "pretrain", "faultmaps", "resilience", "plan", "group"]
RECORDS = {"plan": ("results/plan", "summary.json"), "group": ("results/group", "summary.json"),
           "fat": ("results/fat", "summary.json")}
CHIP_COLUMNS = ["chip_id", "status", "actual_epochs", "val_accuracy", "test_accuracy",
                "planned_epochs", "n_checks", "meets_on_test"]
_CREATE_STORE = ("import sys\nfrom reduce_ops.tracking.store import ensure_store\n"
                 "ensure_store(sys.argv[1])\n")


def _run(root: Path, stage: str) -> float:
    return run_checked(stage_command(root, stage), stage_env(root), f"{root}: {stage}", cwd=root)


def _killed(cmd: list[str], root: Path, delay: float) -> bool:
    """Start cmd, SIGKILL it after `delay` s; False when it ended before."""
    proc = subprocess.Popen(cmd, cwd=root, env=stage_env(root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} \
        if folder.is_dir() else {}


def _record_state(folder: Path, summary_name: str, old: dict[str, bytes]) -> str:
    """old | new | absent | mixed: the record's files as one set, judged by their bytes."""
    now = _snapshot(folder)
    if not now:
        return "absent"
    if now == old:
        return "old"
    try:
        summary = json.loads(now[summary_name])
    except (KeyError, ValueError):
        return "mixed"
    if now.get(summary_name) == old.get(summary_name):
        return "mixed"                    # old summary beside files that changed
    digests = summary.get(sets.FILES_KEY, {})
    whole = all(name in now and sets.sha256(folder / name) == d for name, d in digests.items())
    return "new" if whole and digests else "mixed"


def _registry_state(root: Path) -> tuple[int, int, int]:
    """(chips without a version for the plan, extra versions per (chip, plan, key), champions
    on unverified versions) over the plan's feasible chips."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    plan = pd.read_csv(root / "results/plan/plan.csv", dtype={"chip_id": str})
    plan_id = json.loads((root / "results/plan/summary.json").read_text())["run_id"]
    prefix = read_yaml(root / "params.yaml")["registry"]["prefix"]
    missing = extra = bad_champion = 0
    for chip in plan.loc[plan["feasible"].astype(str).str.lower() == "true", "chip_id"]:
        versions = find_model_versions(uri, names.registered_name(prefix, chip),
                                       {names.VTAG_PLAN_RUN: plan_id})
        keys = [v.tags.get(names.VTAG_MODEL_KEY) for v in versions]
        missing += not versions
        extra += len(keys) - len(set(keys))
        bad_champion += sum(names.CHAMPION in v.aliases and v.tags.get("verified") != "true"
                            for v in versions)
    return missing, extra, bad_champion


def bench_record(stage: str, base: Path, kills: int, rng: random.Random, tmp: Path) -> dict:
    """Kill `stage` (plan, group or fat) in copies of `base`; rerun; count."""
    ref = tmp / f"{stage}-ref"
    shutil.copytree(base, ref)
    duration = _run(ref, stage)
    folder, summary_name = RECORDS[stage]
    rounds = []
    for k in range(kills):
        work = tmp / f"{stage}-kill{k}"
        shutil.copytree(base, work)
        old = _snapshot(work / folder)
        delay = round(rng.uniform(0.05, 1.0) * duration, 2)
        landed = _killed(stage_command(work, stage), work, delay)
        after_kill = _record_state(work / folder, summary_name, old)
        _run(work, stage)
        after_rerun = _record_state(work / folder, summary_name, old)
        lost = int(after_kill == "absent" and bool(old)) + int(after_rerun not in ("new", "old"))
        mixed = int(after_kill == "mixed") + int(after_rerun == "mixed")
        duplicated = 0
        row = {"kill_after_s": delay, "killed_mid_stage": landed, "after_kill": after_kill,
               "after_rerun": after_rerun}
        if stage == "fat":
            missing, duplicated, bad_champion = _registry_state(work)
            lost += missing
            mixed += bad_champion
            chips = pd.read_csv(work / folder / "chips.csv", dtype={"chip_id": str})
            want = pd.read_csv(ref / folder / "chips.csv", dtype={"chip_id": str})
            row["same_outputs"] = bool(chips[CHIP_COLUMNS].equals(want[CHIP_COLUMNS]))
        rounds.append({**row, "lost": lost, "duplicated": duplicated, "mixed": mixed})
        shutil.rmtree(work)
    return _totals(stage, duration, rounds)


def _store_opens(path: Path) -> bool:
    proc = subprocess.run([sys.executable, "-c", _CREATE_STORE, f"sqlite:///{path}"],
                          env=stage_env(path.parent), capture_output=True, text=True, check=False)
    return proc.returncode == 0


def _store_whole(path: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("select name from sqlite_master")}
    except sqlite3.Error:
        return False
    return {"runs", "experiments", "registered_models", "model_versions"} <= tables


def bench_store(kills: int, rng: random.Random, tmp: Path) -> dict:
    """Kill the creation of a new store at random moments; then open it as a stage does."""
    ref = tmp / "store-ref"
    ref.mkdir()
    copy_project(ref)
    cmd = [sys.executable, "-c", _CREATE_STORE]
    t0 = time.perf_counter()
    subprocess.run([*cmd, f"sqlite:///{ref / 'mlflow.db'}"], env=stage_env(ref), check=True,
                   capture_output=True)
    duration = time.perf_counter() - t0
    rounds = []
    for k in range(kills):
        work = tmp / f"store-kill{k}"
        work.mkdir()
        copy_project(work)
        path = work / "mlflow.db"
        delay = round(rng.uniform(0.05, 1.0) * duration, 2)
        landed = _killed([*cmd, f"sqlite:///{path}"], work, delay)
        after_kill = ("absent" if not path.exists() else
                      "whole" if _store_whole(path) else "half")
        opens = _store_opens(path)
        rounds.append({"kill_after_s": delay, "killed_mid_stage": landed,
                       "after_kill": after_kill, "opens_after": opens,
                       "lost": int(not opens), "duplicated": 0,
                       "mixed": int(after_kill == "half")})
        shutil.rmtree(work)
    return _totals("store", duration, rounds)


def _totals(stage: str, duration: float, rounds: list[dict]) -> dict:
    return {"stage": stage, "reference_seconds": round(duration, 1), "kills": len(rounds),
            "killed_mid_stage": sum(r["killed_mid_stage"] for r in rounds),
            "lost": sum(r["lost"] for r in rounds),
            "duplicated": sum(r["duplicated"] for r in rounds),
            "mixed": sum(r["mixed"] for r in rounds), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chips", type=int, default=8)
    parser.add_argument("--stages", nargs="+", default=["plan", "group", "fat", "store"],
                        choices=["plan", "group", "fat", "store"])
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="reduce-ops-bench-kill-") as tmp:
        tmp = Path(tmp)
        results = []
        if set(args.stages) - {"store"}:
            base = tmp / "base"
            base.mkdir()
            copy_project(base)
            write_params(base, [*SMALL, f"faultmaps.n_chips={args.chips}"])
            for stage in SETUP:
                _run(base, stage)
            results += [bench_record(s, base, args.kills, rng, tmp)
                        for s in args.stages if s != "store"]
        if "store" in args.stages:
            results.append(bench_store(args.kills, rng, tmp))
    print(json.dumps({"kills_per_stage": args.kills, "seed": args.seed, "chips": args.chips,
                      "lost": sum(r["lost"] for r in results),
                      "duplicated": sum(r["duplicated"] for r in results),
                      "mixed": sum(r["mixed"] for r in results), "stages": results}))


if __name__ == "__main__":
    main()

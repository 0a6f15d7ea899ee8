"""Wall time of every stage of the default pipeline, for this checkout and for earlier commits,
one after the other on the same machine, and whether two runs' results are the same.

    .venv/bin/python benchmarks/bench_pipeline.py --run before=0da9957 --run after=. \\
        --run one-worker=.:execution.workers=1,execution.torch_threads=1 \\
        --same after one-worker --out /tmp/pipeline

Each run: the code and params of REV (`.` = this working tree) in a throw-away folder, then
`reduce-ops <stage>` for every stage of dvc.yaml in order (what `dvc repro` runs on a fresh
clone), each its own process, the MLflow store created first. Prints one JSON line per stage
and run, then a table of seconds per stage; `--same A B` compares the results two runs wrote
(trials, plan, chips, compare's per-chip rows and curves, robustness, variants), leaving out
what only says when or how long (run ids, seconds, timestamps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import pandas as pd
import yaml
from common import (
    PIPELINE_FILES,
    REPO,
    copy_project,
    run_checked,
    set_options,
    sqlite_store,
    stage_env,
)

# What each run leaves for --same; columns that only say when, how long, or which run.
COMPARED = ["resilience/trials.csv", "plan/plan.csv", "fat/chips.csv", "compare/per_chip.csv",
            "compare/curves.csv", "compare/summary.csv", "robustness/trials.csv",
            "variants/summary.csv"]
TIMING = ("seconds", "run_id", "version", "time", "started", "ended")


def stages(root: Path) -> list[str]:
    """dvc.yaml's stages in order, as `reduce-ops` subcommands."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return [s["cmd"].split("#")[0].split()[1] for s in spec.values()]


def export(rev: str, dest: Path) -> None:
    """The pipeline's files of `rev` (`.`: the working tree) into dest."""
    if rev == ".":
        copy_project(dest)
        return
    tar = subprocess.run(["git", "archive", rev, *PIPELINE_FILES], cwd=REPO, check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")


def run_pipeline(name: str, rev: str, sets: list[str], keep: Path | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"pipeline-{name}-") as tmp:
        root = Path(tmp)
        export(rev, root)
        (root / "data/fault_maps").mkdir(parents=True, exist_ok=True)
        env = stage_env(root, sqlite_store(root))
        run_checked([sys.executable, "-c", "import mlflow, sys; mlflow.MlflowClient(sys.argv[1])"
                     ".search_experiments()", sqlite_store(root)], env, "MLflow store")
        times = {}
        for stage in stages(root):
            cmd = [sys.executable, "-m", "reduce_ops", stage, "--params", str(root / "params.yaml"),
                   *set_options(sets)]
            times[stage] = run_checked(cmd, env, f"{name}: reduce-ops {stage}", cwd=root)
            print(json.dumps({"run": name, "rev": rev, "stage": stage,
                              "seconds": round(times[stage], 1)}), flush=True)
        if keep is not None:
            shutil.copytree(root / "results", keep / name, dirs_exist_ok=True)
    return times


def same(a: Path, b: Path) -> list[str]:
    """One line per compared file: equal, or where the two runs differ."""
    lines = []
    for rel in COMPARED:
        fa, fb = a / rel, b / rel
        if not (fa.is_file() and fb.is_file()):
            lines.append(f"{rel}: missing in {'the first' if not fa.is_file() else 'the second'}")
            continue
        da, db = pd.read_csv(fa), pd.read_csv(fb)
        drop = [c for c in da.columns if any(t in c for t in TIMING)]
        da, db = da.drop(columns=drop), db.drop(columns=drop, errors="ignore")
        if da.shape != db.shape or list(da.columns) != list(db.columns):
            lines.append(f"{rel}: shapes differ {da.shape} vs {db.shape}")
            continue
        diff = ~((da == db) | (da.isna() & db.isna()))
        n = int(diff.to_numpy().sum())
        lines.append(f"{rel}: {'equal' if n == 0 else f'{n} cells differ in ' + ', '.join(da.columns[diff.any()])}"
                     f" ({len(da)} rows; left out: {', '.join(drop) or 'nothing'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=REV[:K=V,...]",
                        help="a run: the code of git revision REV (. = this working tree), "
                             "with params overrides")
    parser.add_argument("--same", nargs=2, action="append", default=[], metavar=("A", "B"))
    parser.add_argument("--out", type=Path, help="keep each run's results/ in OUT/NAME")
    args = parser.parse_args()
    table = {}
    for spec in args.run:
        name, _, rest = spec.partition("=")
        rev, _, sets = rest.partition(":")
        t0 = time.perf_counter()
        table[name] = run_pipeline(name, rev, [s for s in sets.split(",") if s], args.out)
        table[name]["total"] = time.perf_counter() - t0
    df = pd.DataFrame(table).round(1)
    print(df.to_string())
    if len(df.columns) > 1:
        first = df.columns[0]
        print("total / " + first + ": " + ", ".join(
            f"{c} {df.loc['total', c] / df.loc['total', first]:.2f}" for c in df.columns[1:]))
    for a, b in args.same:
        print(f"results of {a} vs {b}:")
        for line in same(args.out / a, args.out / b):
            print("  " + line)


if __name__ == "__main__":
    main()

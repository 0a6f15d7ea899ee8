"""The whole pipeline once per training seed (and fleet seed), in throw-away copies of the
project, then the figures the README reports: mean and range over the runs.

    .venv/bin/python benchmarks/seed_study.py --seeds 0 1 2
    .venv/bin/python benchmarks/seed_study.py --seeds 3 4 --set faultmaps.seed=99   # held out

Each run is `reduce-ops main` on params.yaml with train.seed set (plus any --set), its own
SQLite store, and prints one JSON line; the summary table comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY = ["params.yaml", "dvc.yaml", "MLproject", "reduce_ops", "data/fault_maps"]


def run_seed(seed: int, sets: list[str], keep: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"seed{seed}-") as tmp:
        root = Path(tmp)
        for name in COPY:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, root / name)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
               "PYTHONPATH": str(root)}
        env.pop("MLFLOW_RUN_ID", None)
        cmd = [sys.executable, "-m", "reduce_ops", "main", "--params", str(root / "params.yaml"),
               "--set", f"train.seed={seed}", *[a for s in sets for a in ("--set", s)]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"seed {seed}: reduce-ops main failed:\n{proc.stderr[-2000:]}")
        res = root / "results"
        pre = json.loads((res / "pretrain/metrics.json").read_text())
        fat = json.loads((res / "fat/summary.json").read_text())
        cmp = json.loads((res / "compare/metrics.json").read_text())["policies"]
        if keep is not None:
            shutil.copytree(res, keep / f"seed{seed}", dirs_exist_ok=True)
    pol = {name: {k: p[k] for k in ("n_shipped", "n_meet_on_test", "n_meet_unchecked",
                                    "total_epochs")} for name, p in cmp.items()}
    return {"seed": seed, "minutes": (time.perf_counter() - t0) / 60,
            "baseline_val": pre["val_accuracy"], "baseline_test": pre["test_accuracy"],
            "fat": {k: fat[k] for k in ("n_shipped", "n_meet_on_test", "total_epochs",
                                        "total_planned_epochs", "n_extended",
                                        "n_rejected_by_plan", "n_rejected_at_cap",
                                        "plan_error_mean_abs")},
            "policies": pol}


def summary(rows: list[dict]) -> str:
    def stat(values: list[float]) -> str:
        mean = sum(values) / len(values)
        return f"{mean:.4g} [{min(values):.4g}, {max(values):.4g}]"

    lines = [f"{len(rows)} runs (train seeds {[r['seed'] for r in rows]}): mean [min, max]",
             f"  baseline val {stat([r['baseline_val'] for r in rows])}, "
             f"test {stat([r['baseline_test'] for r in rows])}"]
    f4 = [r["policies"]["fixed-4"]["total_epochs"] for r in rows]
    for name in rows[0]["policies"]:
        p = [r["policies"][name] for r in rows]
        rate = [q["n_meet_on_test"] / q["n_shipped"] if q["n_shipped"] else float("nan")
                for q in p]
        lines.append(f"  {name:>12}: ships {stat([q['n_shipped'] for q in p])}, meet on test "
                     f"{stat([q['n_meet_on_test'] for q in p])} ({stat(rate)} of shipped), "
                     f"trained chips meeting {stat([q['n_meet_unchecked'] for q in p])}, "
                     f"epochs {stat([q['total_epochs'] for q in p])} "
                     f"= {stat([q['total_epochs'] / e for q, e in zip(p, f4)])} of fixed-4")
    lines.append(f"  fat: planned {stat([r['fat']['total_planned_epochs'] for r in rows])} epochs,"
                 f" trained {stat([r['fat']['total_epochs'] for r in rows])}, extended "
                 f"{stat([r['fat']['n_extended'] for r in rows])} chips, |plan error| "
                 f"{stat([r['fat']['plan_error_mean_abs'] for r in rows])} epochs per chip")
    lines.append(f"  minutes per run {stat([r['minutes'] for r in rows])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, help="copy each run's results/ into DIR/seedN")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, args.sets, args.keep)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(summary(rows))


if __name__ == "__main__":
    main()

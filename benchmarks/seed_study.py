"""The whole pipeline once per training seed (and fleet seed), in throw-away copies of the
project, then the figures the README reports: mean and range over the runs.

    .venv/bin/python benchmarks/seed_study.py --seeds 0 1 2
    .venv/bin/python benchmarks/seed_study.py --seeds 3 4 --set faultmaps.seed=99   # held out
    .venv/bin/python benchmarks/seed_study.py --set train.sharpness=sam --set variants=[]
    .venv/bin/python benchmarks/seed_study.py --stages prepare pretrain variants robustness --jobs 2

`--stages` runs those stages one after another instead of the whole pipeline (the summary then
covers what they wrote); `--jobs 2` runs two seeds at once, each at one torch thread.

Each run is `reduce-ops main` on params.yaml with train.seed set (plus any --set), its own
SQLite store, and prints one JSON line; the summary table comes last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from common import run_stages, sqlite_store, stage_env, throwaway_copy


def run_seed(seed: int, sets: list[str], keep: Path | None, stages: list[str],
             threads: int | None) -> dict:
    with throwaway_copy(f"seed{seed}-", ["data/fault_maps"]) as root:
        env = stage_env(root, sqlite_store(root), threads)
        t0 = time.perf_counter()
        run_stages(root, stages, [f"train.seed={seed}", *sets], env, f"seed {seed}")
        res = root / "results"
        pre = json.loads((res / "pretrain/metrics.json").read_text())
        row = {"seed": seed, "minutes": (time.perf_counter() - t0) / 60,
               "baseline_val": pre["val_accuracy"], "baseline_test": pre["test_accuracy"],
               "baseline_sparsity": pre["activation_sparsity"],
               "baseline_flatness": pre["flatness_loss_increase"]}
        if (res / "fat/summary.json").is_file():
            fat = json.loads((res / "fat/summary.json").read_text())
            row["fat"] = {k: fat[k] for k in (
                "n_shipped", "n_meet_on_test", "total_epochs", "total_planned_epochs",
                "n_extended", "n_rejected_by_plan", "n_rejected_at_cap", "plan_error_mean_abs")}
        if (res / "compare/metrics.json").is_file():
            cmp = json.loads((res / "compare/metrics.json").read_text())["policies"]
            row["policies"] = {name: {k: p[k] for k in ("n_shipped", "n_meet_on_test",
                                                        "n_meet_unchecked", "total_epochs")}
                               for name, p in cmp.items()}
        if (res / "robustness/variants.csv").is_file():
            row["variants"] = (pd.read_csv(res / "robustness/variants.csv").set_index("variant")
                               .to_dict("index"))
        if keep is not None:
            shutil.copytree(res, keep / f"seed{seed}", dirs_exist_ok=True)
    return row


def summary(rows: list[dict]) -> str:
    def stat(values: list[float]) -> str:
        mean = sum(values) / len(values)
        return f"{mean:.4g} [{min(values):.4g}, {max(values):.4g}]"

    lines = [f"{len(rows)} runs (train seeds {[r['seed'] for r in rows]}): mean [min, max]",
             f"  baseline val {stat([r['baseline_val'] for r in rows])}, "
             f"test {stat([r['baseline_test'] for r in rows])}, activation sparsity "
             f"{stat([r['baseline_sparsity'] for r in rows])}, flatness "
             f"{stat([r['baseline_flatness'] for r in rows])}"]
    f4 = [r["policies"]["fixed-4"]["total_epochs"] for r in rows if "policies" in r]
    for name in rows[0].get("policies", {}):
        p = [r["policies"][name] for r in rows]
        rate = [q["n_meet_on_test"] / q["n_shipped"] if q["n_shipped"] else float("nan")
                for q in p]
        lines.append(f"  {name:>12}: ships {stat([q['n_shipped'] for q in p])}, meet on test "
                     f"{stat([q['n_meet_on_test'] for q in p])} ({stat(rate)} of shipped), "
                     f"trained chips meeting {stat([q['n_meet_unchecked'] for q in p])}, "
                     f"epochs {stat([q['total_epochs'] for q in p])} "
                     f"= {stat([q['total_epochs'] / e for q, e in zip(p, f4)])} of fixed-4")
    if "fat" in rows[0]:
        lines.append(f"  fat: planned {stat([r['fat']['total_planned_epochs'] for r in rows])}"
                     f" epochs, trained {stat([r['fat']['total_epochs'] for r in rows])}, extended "
                     f"{stat([r['fat']['n_extended'] for r in rows])} chips, |plan error| "
                     f"{stat([r['fat']['plan_error_mean_abs'] for r in rows])} epochs per chip")
    lines.append(f"  minutes per run {stat([r['minutes'] for r in rows])}")
    if "variants" in rows[0]:
        lines.append(variant_summary(rows))
    return "\n".join(lines)


def reference(variants: dict[str, dict], name: str) -> str:
    """What a variant is compared with: a sharpness-aware one with the plain model of the same
    activation threshold, a plain one with the baseline."""
    v = variants[name]
    if v["sharpness"] != "none":
        for other, o in variants.items():
            if o["sharpness"] == "none" and o["activation_threshold"] == v["activation_threshold"]:
                return other
    return "baseline"


def variant_summary(rows: list[dict]) -> str:
    """Per model of the robustness stage: sparsity, flatness, int8 accuracy and the mean test
    accuracy at each (fault model, BER), mean [min, max] over the runs; then each variant's
    paired difference from its reference (same seed, same faults)."""
    names = list(rows[0]["variants"])
    columns = [c for c in rows[0]["variants"][names[0]] if "@" in c]
    fmt = "{:.3f}".format

    def stat(values: list[float]) -> str:
        mean = sum(values) / len(values)
        return f"{fmt(mean)} [{fmt(min(values))}, {fmt(max(values))}]"

    lines = ["models under bit faults (test accuracy, mean [min, max] over the runs):"]
    for name in names:
        v = [r["variants"][name] for r in rows]
        lines.append(f"  {name}: sparsity {stat([x['activation_sparsity'] for x in v])}, "
                     f"flatness {stat([x['flatness_loss_increase'] for x in v])}, int8 "
                     f"{stat([x['int8_accuracy'] for x in v])}")
        lines.append("    " + ", ".join(f"{c} {stat([x[c] for x in v])}" for c in columns))
    for name in names[1:]:
        ref = reference(rows[0]["variants"], name)
        cols = ["int8_accuracy", *columns]
        diffs = {c: [r["variants"][name][c] - r["variants"][ref][c] for r in rows] for c in cols}
        lines.append(f"  {name} - {ref} (paired: same seed, same faults): "
                     + ", ".join(f"{c} {stat(d)}" for c, d in diffs.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--keep", type=Path, help="copy each run's results/ into DIR/seedN")
    parser.add_argument("--stages", nargs="+", default=["main"],
                        help="stages to run in order (default: the whole pipeline)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at once (each at one torch thread when > 1)")
    args = parser.parse_args()
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_seed, seed, args.sets, args.keep, args.stages, threads)
                   for seed in args.seeds]
        rows = []
        for future in futures:
            rows.append(future.result())
            print(json.dumps(rows[-1]), flush=True)
    print(summary(rows))


if __name__ == "__main__":
    main()

"""Replay plan settings against every chip's full FAT curve, one training seed at a time.

    .venv/bin/python benchmarks/plan_replay.py --seeds 0 1 2 --jobs 2 --out /tmp/replay
    .venv/bin/python benchmarks/plan_replay.py --seeds 6 7 --set faultmaps.seed=99 --out /tmp/r99
    .venv/bin/python benchmarks/plan_replay.py --out /tmp/replay --seeds 0 1 2 \\
        --min-reached 0.6 0.7 --statistics mean max          # replay only: curves are kept

Per seed, in a throw-away copy of the project: `prepare`, `faultmaps`, `pretrain` and
`resilience` with train.seed set (plus any --set), then every fleet chip's FAT curve from the
baseline, validation and test accuracy every `resilience.checkpoint_every` epochs up to
`plan.budget_cap` (ONE run per chip, as `fat` and `compare` train it). The replay then runs the
project's own `make_plan` for each (statistic, min_reached) and `compare`'s own policies over
those curves (the fixed policies of `compare.fixed_epochs`, each verified Reduce plan, the
oracle, all with the validation check of `verify.margin`): compare's summary per seed (chips
shipped, shipped chips meeting the constraint on test, total epochs) and the ratio to fixed 4
epochs. Curves and trials are kept under --out/<seed>/, so a second call with other settings
only replays. One JSON line per seed and policy, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from common import (
    REPO,
    run_checked,
    run_stages,
    set_options,
    sqlite_store,
    stage_env,
    throwaway_copy,
)

from reduce_ops import compare
from reduce_ops.config import load_config
from reduce_ops.planning import make_plan
from reduce_ops.shipping import ShippingRule

STAGES = ["prepare", "faultmaps", "pretrain", "resilience"]


def measure(seed: int, sets: list[str], out: Path) -> None:
    """Train the seed's baseline and trials, then every chip's curve -> out/{trials,curves}.csv."""
    with throwaway_copy(f"replay{seed}-", ["data/fault_maps"]) as root:
        env = stage_env(root, sqlite_store(root), threads=1)
        seed_sets = [f"train.seed={seed}", *sets]
        run_stages(root, STAGES, seed_sets, env, f"seed {seed}")
        run_checked([sys.executable, __file__, "--curves-of", str(root), *set_options(seed_sets)],
                    env, f"seed {seed}: chip curves")
        out.mkdir(parents=True, exist_ok=True)
        for name in ("trials.csv", "summary.json"):
            (out / name).write_bytes((root / "results/resilience" / name).read_bytes())
        (out / "curves.csv").write_bytes((root / "curves.csv").read_bytes())


def chip_curves(root: Path, sets: list[str]) -> None:
    """In a measured project copy: every chip's curve -> root/curves.csv (one torch thread)."""
    import torch

    from reduce_ops.data import load_prepared
    from reduce_ops.fault_aware import fat_curve
    from reduce_ops.hardware import ArrayGeometry, load_fleet
    from reduce_ops.models import load_checkpoint

    torch.set_num_threads(1)
    cfg = load_config(root / "params.yaml", sets)
    data = load_prepared(cfg.path("prepared"))
    baseline, _ = load_checkpoint(cfg.path("baseline"))
    step = cfg.resilience.checkpoint_every
    amounts = [round(k * step, 9) for k in range(round(cfg.plan.budget_cap / step) + 1)]
    rows = []
    for fmap in load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols)):
        c = fat_curve(baseline, fmap, cfg.hardware.layer_types, data, amounts, cfg.fat, "cpu")
        rows += [(fmap.chip_id, fmap.fault_rate, a, v, t) for a, v, t in
                 zip(c.amounts, c.accuracy["val_accuracy"], c.accuracy["test_accuracy"])]
    pd.DataFrame(rows, columns=["chip_id", "fault_rate", "amount", "val_accuracy",
                                "test_accuracy"]).to_csv(root / "curves.csv", index=False)


class _Recorded:
    """One chip's kept curve in place of a FAT session: `compare.run_policies` advances it and
    reads accuracies, and gets what the one run measured at that amount."""

    def __init__(self, curve: pd.DataFrame) -> None:
        self.curve, self.amount = curve.set_index(curve["amount"].round(6)), 0.0

    def advance(self, amount: float) -> None:
        self.amount = amount

    def accuracies(self, splits) -> dict[str, float]:
        row = self.curve.loc[round(self.amount, 6)]
        return {f"{s}_accuracy": float(row[f"{s}_accuracy"]) for s in splits}


def replay(out: Path, cfg, settings: list[tuple[str, float]]) -> pd.DataFrame:
    """compare's summary (fixed policies, one verified Reduce plan per (statistic, min_reached),
    the oracle) over the kept curves of one seed, through compare's own policies."""
    info = json.loads((out / "summary.json").read_text())
    trials, curves = pd.read_csv(out / "trials.csv"), pd.read_csv(out / "curves.csv")
    chips = curves.groupby("chip_id", sort=False)["fault_rate"].first().reset_index()
    rule = ShippingRule(info["decision_level"], info["constraint_level"], cfg.verify.margin,
                        cfg.verify.step, cfg.plan.budget_cap)
    plans = {f"reduce-{stat}@{mr:g}": make_plan(
        trials, chips, rule.ship_level, stat, cfg.resilience.checkpoint_every,
        cfg.plan.safety_margin, rule.cap, mr) for stat, mr in settings}
    policy_list = compare.policies(
        cfg.compare.fixed_epochs,
        {name: dict(zip(r.plan["chip_id"], r.plan["planned_epochs"].astype(float)))
         for name, r in plans.items()}, chips["chip_id"])
    rows = [row for (cid, rate), g in curves.groupby(["chip_id", "fault_rate"], sort=False)
            for row in compare.run_policies(_Recorded(g), policy_list,
                                            SimpleNamespace(chip_id=cid, fault_rate=rate), rule)]
    summary = compare.summarize(pd.DataFrame(rows, columns=compare.PER_CHIP_COLUMNS), policy_list)
    summary["max_feasible_rate"] = summary["policy"].map(
        {name: r.curve.max_feasible_rate for name, r in plans.items()})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="curves are kept in OUT/seedN (required)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds measured at once")
    parser.add_argument("--statistics", nargs="+", default=None)
    parser.add_argument("--min-reached", type=float, nargs="+", default=None)
    parser.add_argument("--curves-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.curves_of is not None:
        return chip_curves(args.curves_of, args.sets)
    if args.out is None:
        parser.error("--out is required")
    cfg = load_config(REPO / "params.yaml", args.sets)
    todo = [s for s in args.seeds if not (args.out / f"seed{s}" / "curves.csv").is_file()]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda s: measure(s, args.sets, args.out / f"seed{s}"), todo))
    settings = [(stat, mr) for stat in args.statistics or [cfg.plan.statistic]
                for mr in args.min_reached or [cfg.plan.min_reached]]
    parts = []
    for seed in args.seeds:
        summary = replay(args.out / f"seed{seed}", cfg, settings).assign(seed=seed)
        for r in summary.to_dict("records"):
            print(json.dumps(r), flush=True)
        parts.append(summary)
    df = pd.concat(parts, ignore_index=True)
    f4 = df[df["policy"] == compare.fixed_policy_name(4)].set_index("seed")["total_epochs"]
    df["ratio_to_fixed4"] = df["total_epochs"] / df["seed"].map(f4)
    print(df.pivot_table(index="policy", columns="seed", sort=False,
                         values=["n_shipped", "ratio_to_fixed4", "meet_rate"]).round(3).to_string())

if __name__ == "__main__":
    main()

"""Replay shipping rules over every chip's recorded FAT curve, one training seed at a time.

    .venv/bin/python benchmarks/plan_replay.py --seeds 0 1 2 3 4 --jobs 2 --out /tmp/replay
    .venv/bin/python benchmarks/plan_replay.py --seeds 5 6 --set faultmaps.seed=99 --out /tmp/r99
    .venv/bin/python benchmarks/plan_replay.py --out /tmp/replay --seeds 0 1 2 3 4 \\
        --escape-rates 0.1 0.2 0.3 --margins 0 0.0075      # replay only: curves are kept

Per seed, in a throw-away copy of the project: `prepare`, `faultmaps`, `pretrain`,
`resilience`, `plan` and `compare` with train.seed set (plus any --set; eFAT off). `compare`
trains every chip once to the budget cap and records both splits at every amount a plan may
ask for (results/compare/curves.csv), so the replay runs the project's own plan and
verification (reduce_ops.operating) for any rule on those curves, without training: a test
floor's shipped chips, yield of the recoverable chips, escapes and overkill, and epochs against
fixed 4 epochs'. Curves and trials are kept under --out/seedN/. One JSON line per seed and rule,
then a table, then the spread over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from common import REPO, run_and_keep

from reduce_ops.compare import ChipCurve
from reduce_ops.config import load_config
from reduce_ops.hardware import FaultMap
from reduce_ops.operating import PlanSettings, recoverable, run_rule
from reduce_ops.records.plan import rule_from_summary
from reduce_ops.shipping import Measurement, ShippingRule
from reduce_ops.yields import floor_report

STAGES = ["prepare", "faultmaps", "pretrain", "resilience", "plan", "compare"]
KEPT = {"trials.csv": "results/resilience/trials.csv", "curves.csv": "results/compare/curves.csv",
        "plan_summary.json": "results/plan/summary.json",
        "compare_summary.csv": "results/compare/summary.csv"}


def measure(seed: int, sets: list[str], out: Path) -> None:
    """Run the seed's pipeline up to compare in a throw-away copy; keep what the replay reads."""
    run_and_keep(f"replay{seed}-", STAGES, [f"train.seed={seed}", "group.enabled=false", *sets],
                 KEPT, out, f"seed {seed}", threads=1)


def load_curves(path: Path) -> tuple[list[FaultMap], list[ChipCurve]]:
    """compare's curves.csv as the chips' curves (and stand-ins for their fault maps, which
    planning only reads the fault rate of)."""
    df = pd.read_csv(path, dtype={"chip_id": str})
    fleet, curves = [], []
    for (chip, rate), g in df.groupby(["chip_id", "fault_rate"], sort=False):
        c = ChipCurve(chip, float(rate))
        for r in g.itertuples(index=False):
            c.amounts.append(float(r.amount))
            c.val.append(Measurement(r.val_accuracy, 0, int(r.val_lost), int(r.val_gained)))
            c.test.append(Measurement(r.test_accuracy, 0, int(r.test_lost), int(r.test_gained)))
        curves.append(c)
        fleet.append(_Rate(chip, float(rate)))
    return fleet, curves


@dataclasses.dataclass(frozen=True)
class _Rate:
    """What planning reads of a fault map."""

    chip_id: str
    fault_rate: float


def replay(out: Path, rules: dict[str, ShippingRule], settings: PlanSettings) -> pd.DataFrame:
    """Every rule on one seed's kept curves: shipped, yield, escapes, overkill, epochs."""
    trials = pd.read_csv(out / "trials.csv")
    fleet, curves = load_curves(out / "curves.csv")
    rows = []
    for name, rule in rules.items():
        for c in curves:             # the split sizes the rule's band reads
            c.val = [dataclasses.replace(m, n=rule.n_decision) for m in c.val]
        per_chip = run_rule(rule, trials, fleet, curves, settings)
        floor = floor_report(per_chip["shipped"].astype(bool),
                             per_chip["meets_on_test"].astype(bool), recoverable(curves, rule))
        rows.append({"rule": name, "n_shipped": floor.n_shipped,
                     "n_recoverable": floor.n_recoverable, "yield": floor.yield_,
                     "n_escapes": floor.n_escapes, "escape_rate": floor.escape_rate,
                     "n_overkill": floor.n_overkill,
                     "epochs": float(per_chip["epochs"].sum()),
                     "epochs_ratio_to_fixed4": float(per_chip["epochs"].sum()) / (4 * len(curves))})
    return pd.DataFrame(rows)


def rules_for(out: Path, escape_rates: list[float], margins: list[float],
              absolute: list[float], drops: list[float]) -> dict[str, ShippingRule]:
    """The seed's own rule (from its plan) and its variants: flat margins (one check), escape
    rates (pooled as params pool, and one check), at the seed's own constraint, at other
    absolute levels and at drops from the baseline on each split (paired)."""
    summary = json.loads((out / "plan_summary.json").read_text())
    own = rule_from_summary(summary, str(out / "plan_summary.json"))
    constraints = {"own": own}
    constraints.update({f"absolute {level:g}": dataclasses.replace(
        own, decision_level=level, constraint_level=level, paired=False) for level in absolute})
    constraints.update({f"drop {d * 100:g}pt": dataclasses.replace(
        own, decision_level=summary["baseline_val_accuracy"] - d,
        constraint_level=summary["baseline_test_accuracy"] - d, paired=True) for d in drops})
    rules = {"params": own}
    pool = max(own.pool, 2)
    for name, base in constraints.items():
        rules.update({f"{name}, flat {m * 100:+.2f}pt, one check": dataclasses.replace(
            base, margin=m, escape_rate=0.0, pool=1) for m in margins})
        for e in escape_rates:
            rules[f"{name}, escape {e:g}, one check"] = dataclasses.replace(
                base, margin=0.0, escape_rate=e, pool=1)
            rules[f"{name}, escape {e:g}, pooled over {pool}"] = dataclasses.replace(
                base, margin=0.0, escape_rate=e, pool=pool)
    return rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True, help="curves are kept in OUT/seedN")
    parser.add_argument("--jobs", type=int, default=1, help="seeds measured at once")
    parser.add_argument("--escape-rates", type=float, nargs="*", default=[])
    parser.add_argument("--margins", type=float, nargs="*", default=[])
    parser.add_argument("--absolute", type=float, nargs="*", default=[],
                        help="absolute constraint levels to replay (decided and judged at it)")
    parser.add_argument("--drop", type=float, nargs="*", default=[],
                        help="drops from the baseline to replay (each split against its own)")
    args = parser.parse_args()
    cfg = load_config(REPO / "params.yaml", args.sets)
    todo = [s for s in args.seeds if not (args.out / f"seed{s}" / "curves.csv").is_file()]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda s: measure(s, args.sets, args.out / f"seed{s}"), todo))
    settings = PlanSettings(cfg.plan.statistic, cfg.resilience.checkpoint_every,
                            cfg.plan.safety_margin, cfg.plan.min_reached, cfg.plan.fleet_budget)
    parts = []
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        table = replay(out, rules_for(out, args.escape_rates, args.margins, args.absolute,
                                      args.drop), settings).assign(seed=seed)
        for r in table.to_dict("records"):
            print(json.dumps(r), flush=True)
        parts.append(table)
    df = pd.concat(parts, ignore_index=True)
    print(df.pivot_table(index="rule", columns="seed", sort=False,
                         values=["yield", "escape_rate", "epochs_ratio_to_fixed4"]
                         ).round(3).to_string())
    spread = df.groupby("rule", sort=False).agg(
        yield_mean=("yield", "mean"), yield_min=("yield", "min"),
        escapes_mean=("escape_rate", "mean"), escapes_max=("escape_rate", "max"),
        epochs_mean=("epochs_ratio_to_fixed4", "mean"),
        epochs_max=("epochs_ratio_to_fixed4", "max"))
    print(spread.round(3).to_string())


if __name__ == "__main__":
    main()

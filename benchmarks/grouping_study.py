"""Where eFAT grouping pays: planned epochs after grouping / before, over many fleets.

    .venv/bin/python benchmarks/grouping_study.py [--fleets 10] [--chips 100]

Uses the plan of the default pipeline (results/plan/curve_points.csv, budget cap and checkpoint
granularity from params.yaml) and forms the groups of freshly generated fleets: uniform (each
chip's faulty PEs independent) and wafer fleets with several chips-per-wafer, shared-defect
fractions and rate spreads. Per setting it prints the ratio of planned epochs (groups against
per-chip Reduce), mean [min, max] over the fleet seeds, with the greedy merge alone and with the
refinement. Planned epochs only: what training adds (a group that misses its plan trains on) is
measured by `reduce-ops compare` and benchmarks/seed_study.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reduce_ops.grouping import form_groups  # noqa: E402
from reduce_ops.hardware import ArrayGeometry, generate_fleet, wafer_fleet  # noqa: E402
from reduce_ops.planning import fit_monotone_curve, planned_epochs  # noqa: E402

# (label, generator, chips per wafer, shared fraction, rate spread)
SETTINGS = [
    ("uniform (default fleet)", "uniform", 0, 0.0, 0.0),
    ("wafer 10 chips, 80 % shared, +-0.02 (wafer default)", "wafer", 10, 0.8, 0.02),
    ("wafer 10 chips, 80 % shared, rates independent (+-0.5)", "wafer", 10, 0.8, 0.5),
    ("wafer 10 chips, 50 % shared, +-0.02", "wafer", 10, 0.5, 0.02),
    ("wafer 10 chips, 90 % shared, +-0.02", "wafer", 10, 0.9, 0.02),
    ("wafer 25 chips, 80 % shared, +-0.02", "wafer", 25, 0.8, 0.02),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleets", type=int, default=10, help="fleet seeds per setting")
    parser.add_argument("--chips", type=int, default=100)
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    points = pd.read_csv(REPO / "results/plan/curve_points.csv")
    curve = fit_monotone_curve(points["fault_rate"], points["needed"],
                               params["plan"]["budget_cap"])
    fm, group = params["faultmaps"], params["group"]

    def planned_at(r: np.ndarray) -> np.ndarray:
        return planned_epochs(curve, r, params["resilience"]["checkpoint_every"],
                              params["plan"]["safety_margin"])

    geometry = ArrayGeometry(params["hardware"]["rows"], params["hardware"]["cols"])
    print(f"plan: results/plan (feasible up to fault rate {curve.max_feasible_rate:.3f}); "
          f"{args.chips} chips, rates {fm['rate_distribution']} in [{fm['rate_min']}, "
          f"{fm['rate_max']}], group.max_size {group['max_size']}; {args.fleets} fleets each")
    for label, generator, per_wafer, shared, spread in SETTINGS:
        ratios: dict[str, list[float]] = {"greedy": [], "refined": []}
        grouped: list[float] = []
        empty = 0
        for seed in range(args.fleets):
            if generator == "wafer":
                fleet = wafer_fleet(args.chips, geometry, per_wafer, shared,
                                    fm["rate_distribution"], fm["rate_min"], fm["rate_max"],
                                    seed, rate_spread=spread)
            else:
                fleet = generate_fleet(args.chips, geometry, generator, fm["rate_distribution"],
                                       fm["rate_min"], fm["rate_max"], seed)
            own = planned_at(np.array([m.fault_rate for m in fleet]))
            keep = [i for i in range(len(fleet)) if np.isfinite(own[i]) and own[i] > 0]
            if not keep:
                empty += 1          # every chip infeasible or needing nothing: nothing to group
                continue
            maps, mine = [fleet[i] for i in keep], own[keep]
            for name, rounds in (("greedy", 0), ("refined", group["refine_rounds"])):
                groups = form_groups(maps, mine, planned_at, group["max_size"],
                                     group["candidates"], group["sample_pes"],
                                     refine_rounds=rounds)
                ratios[name].append(sum(g.planned_epochs for g in groups) / mine.sum())
            grouped.append(sum(len(g.members) for g in groups if len(g.members) > 1)
                           / len(maps))
        stat = {k: f"{np.mean(v):.2f} [{min(v):.2f}, {max(v):.2f}]" for k, v in ratios.items()}
        print(f"{label}: planned epochs ratio greedy {stat['greedy']}, refined "
              f"{stat['refined']}; chips in groups {np.mean(grouped):.0%}"
              + (f" ({empty} fleets with nothing to group left out)" if empty else ""), flush=True)


if __name__ == "__main__":
    main()

"""eFAT grouping at a fab's scale: form the groups of a 10,000-chip fleet on a 256x256 array.

    .venv/bin/python benchmarks/bench_grouping.py [--chips 10000] [--generator wafer]

The plan's curve is the default pipeline's (results/plan/curve_points.csv) when present, else a
fixed curve of the same shape. Prints one JSON line: chips, groups, seconds (goal: 60) and the
planned epochs before and after grouping.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
from common import REPO

from reduce_ops.grouping import form_groups
from reduce_ops.hardware import ArrayGeometry, generate_fleet, wafer_fleet
from reduce_ops.planning import fit_monotone_curve, planned_epochs

# need (epochs) at each fault rate, as the default pipeline measured it (train seed 0)
FALLBACK = ([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35], [0.0, 0.1, 0.33, 0.45, 1.67, 2.66,
                                                             3.52, 3.77])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=10_000)
    parser.add_argument("--generator", choices=["uniform", "wafer"], default="uniform")
    parser.add_argument("--max-size", type=int, default=8)
    args = parser.parse_args()
    points = REPO / "results/plan/curve_points.csv"
    if points.is_file():
        p = pd.read_csv(points)
        rates, needs = p["fault_rate"].tolist(), p["needed"].tolist()
    else:
        rates, needs = FALLBACK
    curve = fit_monotone_curve(rates, needs, 5.0)

    def planned_at(r: np.ndarray) -> np.ndarray:
        return planned_epochs(curve, r, 0.25)

    geometry = ArrayGeometry(256, 256)
    t0 = time.perf_counter()
    high = curve.max_feasible_rate
    if args.generator == "wafer":
        fleet = wafer_fleet(args.chips, geometry, 10, 0.8, "uniform", 0.0, high, 7)
    else:
        fleet = generate_fleet(args.chips, geometry, "uniform", "uniform", 0.0, high, 7)
    made = time.perf_counter() - t0
    own = planned_at(np.array([m.fault_rate for m in fleet]))
    keep = [i for i in range(len(fleet)) if np.isfinite(own[i]) and own[i] > 0]
    t0 = time.perf_counter()
    groups = form_groups([fleet[i] for i in keep], own[keep], planned_at, args.max_size)
    seconds = time.perf_counter() - t0
    before, after = float(own[keep].sum()), float(sum(g.planned_epochs for g in groups))
    print(json.dumps({"chips": args.chips, "grouped_candidates": len(keep),
                      "generator": args.generator, "groups": len(groups),
                      "groups_of_2_or_more": sum(len(g.members) > 1 for g in groups),
                      "seconds": round(seconds, 2), "goal_seconds": 60,
                      "epochs_before": before, "epochs_after": after,
                      "epochs_ratio": round(after / before, 3), "fleet_seconds": round(made, 1)}))


if __name__ == "__main__":
    main()

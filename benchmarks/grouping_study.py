"""Where eFAT grouping pays: planned epochs after grouping / before, over many fleets.

    .venv/bin/python benchmarks/grouping_study.py [--fleets 10] [--chips 100]

Uses the plan of the default pipeline (results/plan/curve_points.csv, budget cap and checkpoint
granularity from params.yaml) and forms the groups of freshly generated fleets: uniform (each
chip's faulty PEs independent) and wafer fleets with several chips-per-wafer, shared-defect
fractions and rate spreads. Per setting it prints the ratio of planned epochs (groups against
per-chip Reduce), mean [min, max] over the fleet seeds, with the greedy merge alone and with the
refinement. Planned epochs only: what training adds (a group that misses its plan trains on) is
measured by `reduce-ops compare` and benchmarks/seed_study.py.

On fleets of independent maps (uniform) it also prints a lower bound on the ratio that holds for
ANY grouping, whatever the algorithm (the larger of `independent_bound` and `share_bound`). `--curve` reads another plan's
curve_points.csv (e.g. one kept by seed_study.py --keep) instead of the pipeline's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import REPO

from reduce_ops.grouping import form_groups, fused_plan
from reduce_ops.hardware import ArrayGeometry, generate_fleet, wafer_fleet

# (label, generator, chips per wafer, shared fraction, rate spread)
SETTINGS = [
    ("uniform (default fleet)", "uniform", 0, 0.0, 0.0),
    ("wafer 10 chips, 80 % shared, +-0.02 (wafer default)", "wafer", 10, 0.8, 0.02),
    ("wafer 10 chips, 80 % shared, rates independent (+-0.5)", "wafer", 10, 0.8, 0.5),
    ("wafer 10 chips, 50 % shared, +-0.02", "wafer", 10, 0.5, 0.02),
    ("wafer 10 chips, 90 % shared, +-0.02", "wafer", 10, 0.9, 0.02),
    ("wafer 25 chips, 80 % shared, +-0.02", "wafer", 25, 0.8, 0.02),
]


def independent_bound(planned_at, rates: np.ndarray, own: np.ndarray, edge: float) -> float:
    """A lower bound on (planned epochs of any grouping) / (per-chip planned epochs) for chips
    with independent fault maps of these rates, groups within fault rate `edge`.

    A group's fused rate is in expectation u = 1 - prod(1 - r_i) >= 1 - exp(-sum r_i); staying
    within `edge` bounds sum r_i <= x0 = -ln(1 - edge), and on [0, x0] the concave 1 - exp(-x)
    is >= x * edge / x0. For any line a + b*u (b >= 0) below the plan's epochs on [min r, edge]
    a group then costs >= a + b * (edge / x0) * sum of its members' rates: summed over groups,
    >= a * n_groups + b * (edge / x0) * sum r, with n_groups >= ceil(sum r / x0) (all chips if
    a < 0). The best such line is the bound. Exact maps deviate from the expectation by about
    sqrt(r / n_PEs) in fault rate (0.1 % of a 256x256 array), far below the plan's granularity.
    """
    x0 = -np.log1p(-edge)
    total = float(rates.sum())
    u = np.linspace(float(rates.min()), edge, 4001)
    cost = planned_at(u)
    best = 0.0
    for b in np.linspace(0.0, float(cost.max()) / max(edge - float(rates.min()), 1e-9), 2001):
        a = float((cost - b * u).min())
        n_groups = np.ceil(total / x0 - 1e-12) if a >= 0 else len(rates)
        best = max(best, a * n_groups + b * (edge / x0) * total)
    return best / float(own.sum())


def share_bound(planned_at, rates: np.ndarray, own: np.ndarray, edge: float,
                points: int = 20001) -> float:
    """A second lower bound on the same ratio, tight where the need grows faster than linearly.

    With x = -ln(1 - r) a group's expected fused rate is 1 - exp(-S), S the sum of its members'
    x, and S <= x0 = -ln(1 - edge). Write g(S) for the plan's epochs there and share a group's
    cost among its members in proportion to x: member i pays x_i * g(S) / S with x_i <= S <= x0,
    so at least x_i * h(x_i), h(x) = the least g(s) / s over s in [x, x0]. Summed over members
    that is a bound for any grouping; where g(s) / s only grows (a convex need from zero) h(x_i)
    = g(x_i) / x_i and the bound is the per-chip epochs themselves: no grouping saves anything.
    The least is taken on a grid with each cell's g at its left end over s at its right end
    (g never decreases), so the bound never reads above the exact one. Like
    `independent_bound` it reads expected fused rates; exact maps deviate by about
    sqrt(r / n_PEs) in fault rate, which can move one group across a step of the plan."""
    x = -np.log1p(-np.asarray(rates, dtype=np.float64))
    x0 = -np.log1p(-edge)
    if x0 <= float(x.min()):       # no group above its largest member fits within the edge
        return 1.0
    grid = np.linspace(float(x.min()), x0, points)
    low = planned_at(-np.expm1(-grid[:-1])) / grid[1:]          # per cell [grid_k, grid_k+1]
    tail = np.minimum.accumulate(low[::-1])[::-1]               # least over the cells from k on
    cell = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, points - 2)
    nxt = np.minimum(cell + 1, points - 2)
    first = planned_at(np.asarray(rates, dtype=np.float64)) / grid[cell + 1]   # x_i's own cell
    later = np.where(cell + 1 <= points - 2, tail[nxt], np.inf)
    h = np.minimum(first, later)
    return float((x * h).sum() / own.sum())


def grouping_ratios(points: pd.DataFrame, params: dict, fleets: int, chips: int,
                    fleet_seed: int = 0, settings=SETTINGS) -> list[dict]:
    """Per fleet setting: the planned-epochs ratio (groups / per-chip) of the greedy merge and of
    the refinement over `fleets` fleet seeds, the share of chips in groups, and on uniform
    fleets the lower bound that holds for any grouping (lists over the fleets)."""
    fm, group = params["faultmaps"], params["group"]
    curve, planned_at, miss_at = fused_plan(points, params["plan"]["budget_cap"],
                                            params["resilience"]["checkpoint_every"],
                                            params["plan"]["safety_margin"])
    geometry = ArrayGeometry(params["hardware"]["rows"], params["hardware"]["cols"])
    rows = []
    for label, generator, per_wafer, shared, spread in settings:
        row = {"setting": label, "greedy": [], "refined": [], "bound": [], "grouped": [],
               "empty": 0}
        for seed in range(fleet_seed, fleet_seed + fleets):
            if generator == "wafer":
                fleet = wafer_fleet(chips, geometry, per_wafer, shared,
                                    fm["rate_distribution"], fm["rate_min"], fm["rate_max"],
                                    seed, rate_spread=spread)
            else:
                fleet = generate_fleet(chips, geometry, generator, fm["rate_distribution"],
                                       fm["rate_min"], fm["rate_max"], seed)
            own = planned_at(np.array([m.fault_rate for m in fleet]))
            keep = [i for i in range(len(fleet)) if np.isfinite(own[i]) and own[i] > 0]
            if not keep:
                row["empty"] += 1      # every chip infeasible or needing nothing: nothing to group
                continue
            maps, mine = [fleet[i] for i in keep], own[keep]
            if generator == "uniform":        # both hold for any grouping: the larger
                kept_rates = np.array([m.fault_rate for m in maps])
                row["bound"].append(max(
                    independent_bound(planned_at, kept_rates, mine, curve.max_feasible_rate),
                    share_bound(planned_at, kept_rates, mine, curve.max_feasible_rate)))
            for name, rounds in (("greedy", 0), ("refined", group["refine_rounds"])):
                groups = form_groups(maps, mine, planned_at, group["max_size"],
                                     group["candidates"], group["sample_pes"],
                                     refine_rounds=rounds,
                                     miss_at=miss_at if group["objective"] == "expected" else None,
                                     cap=params["plan"]["budget_cap"])
                row[name].append(sum(g.planned_epochs for g in groups) / mine.sum())
            row["grouped"].append(sum(len(g.members) for g in groups if len(g.members) > 1)
                                  / len(maps))
        rows.append(row)
    return rows


def spread(values: list[float]) -> str:
    """mean [min, max]"""
    return f"{np.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleets", type=int, default=10, help="fleet seeds per setting")
    parser.add_argument("--chips", type=int, default=100)
    parser.add_argument("--curve", type=Path, default=REPO / "results/plan/curve_points.csv",
                        help="a plan's curve_points.csv (default: the pipeline's)")
    parser.add_argument("--fleet-seed", type=int, default=0,
                        help="first fleet seed (1234 with --fleets 1: the default fleet)")
    parser.add_argument("--max-size", type=int, help="group.max_size instead of params.yaml's")
    parser.add_argument("--candidates", type=int, help="group.candidates instead")
    parser.add_argument("--refine-rounds", type=int, help="group.refine_rounds instead")
    parser.add_argument("--objective", choices=["planned", "expected"],
                        help="group.objective instead of params.yaml's")
    parser.add_argument("--uniform-only", action="store_true",
                        help="only the default fleet's setting (independent maps)")
    args = parser.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if not args.curve.is_file():
        raise SystemExit(f"{args.curve}: no plan curve; run `dvc repro plan` first")
    points = pd.read_csv(args.curve)
    fm, group = params["faultmaps"], params["group"]
    group.update({k: v for k, v in (("max_size", args.max_size), ("candidates", args.candidates),
                                    ("refine_rounds", args.refine_rounds),
                                    ("objective", args.objective)) if v is not None})
    curve = fused_plan(points, params["plan"]["budget_cap"],
                       params["resilience"]["checkpoint_every"],
                       params["plan"]["safety_margin"])[0]
    print(f"plan: {args.curve} (feasible up to fault rate {curve.max_feasible_rate:.3f}); "
          f"{args.chips} chips, rates {fm['rate_distribution']} in [{fm['rate_min']}, "
          f"{fm['rate_max']}], group.max_size {group['max_size']}, candidates "
          f"{group['candidates']}, refine_rounds {group['refine_rounds']}; {args.fleets} fleets "
          f"each (seeds from {args.fleet_seed})")
    for row in grouping_ratios(points, params, args.fleets, args.chips, args.fleet_seed,
                               SETTINGS[:1 if args.uniform_only else None]):
        print(f"{row['setting']}: planned epochs ratio greedy {spread(row['greedy'])}, refined "
              f"{spread(row['refined'])}; chips in groups {np.mean(row['grouped']):.0%}"
              + (f"; any grouping >= {spread(row['bound'])}" if row["bound"] else "")
              + (f" ({row['empty']} fleets with nothing to group left out)"
                 if row["empty"] else ""), flush=True)


if __name__ == "__main__":
    main()

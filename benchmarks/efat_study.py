"""eFAT where it can pay: every zoo network's retraining need against fault rate, how concave
it is, and what grouping can save on it.

    .venv/bin/python benchmarks/efat_study.py --out /tmp/efat --networks lenet mlp vgg11
    .venv/bin/python benchmarks/efat_study.py --out /tmp/efat-digits --set data.source=digits
    .venv/bin/python benchmarks/efat_study.py --out /tmp/efat --report-only    # kept runs only
    .venv/bin/python benchmarks/efat_study.py --out /tmp/efat-r10 --networks resnet18 \
        --set "resilience.fault_rates=[0.1]"      # a rate the first run's grid left out, then
    .venv/bin/python benchmarks/efat_study.py --out /tmp/efat --report-only --merge /tmp/efat-r10
    .venv/bin/python benchmarks/efat_study.py --out /tmp/efat-digits --networks resnet18 \
        --seeds 0 1 2 --set data.source=digits --pipeline    # eFAT against Reduce, each seed

Per network and training seed, in a throw-away copy of the project: `prepare`, `faultmaps`,
`pretrain`, `resilience` and `plan` on the study's params file (default
params-efat-study.yaml: a reduced resilience grid, a drop of 2.5 points from each network's
own baseline) with model.name and train.seed set (plus any --set). The plan's curve points, trials
and the baseline's metrics are kept under OUT/<network>-seed<k>/; a run already kept there is
not run again. `--merge DIR` (repeatable) adds the curve points that runs kept in DIR (the same
layout, e.g. a run at rates the first one's grid left out) have at rates the run in OUT lacks;
which rates are planned is then refitted over all of them as the plan fits it (the fraction of
repetitions that reached, non-increasing in the rate, against plan.min_reached). Then, per
network (over its seeds):
- the need at every measured rate (the plan's statistic over the repetitions that reached,
  mean [min, max] over the seeds), and its concavity: need(2r) / (2 need(r)) on the plan's
  fitted curve at r = 0.1, 0.15, 0.2 and 0.25 (1: linear, grouping saves little; above 1:
  a fused map costs more than its members, grouping cannot save; below 1, grouping pays);
- what grouping saves on that curve (benchmarks/grouping_study.py): the lower bound that holds
  for any grouping of independent (uniform) maps, and the planned-epochs ratio the project's
  grouping reaches on uniform and wafer fleets;
- the cost: minutes per run on this machine.
It prints one JSON line per run and a table; writes OUT/summary.csv and OUT/need_curves.png.

`--pipeline` runs, per network and seed, the whole pipeline with grouping on the same params
(`group`, `fat` and `compare` after the stages above; the fleet of `faultmaps`, e.g. `--set
faultmaps.generator=wafer`), kept under OUT/pipeline-<network>-<generator>-seed<k>/, and prints
per run eFAT's trained epochs against Reduce's (compare's `efat` and `reduce-<statistic>`
policies, every member verified on its own chip), the grouping's planned ratio, the lower bound
for any grouping on that run's own fleet and plan (independent maps only: uniform fleets), and
whether both policies ship the same chips and the same chips meet the constraint on test;
OUT/pipeline.csv has the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from common import REPO, run_and_keep
from grouping_study import SETTINGS, grouping_ratios, independent_bound, share_bound, spread
from matplotlib.figure import Figure

from reduce_ops.grouping import fused_plan
from reduce_ops.planning import feasible_needs

STAGES = ["prepare", "faultmaps", "pretrain", "resilience", "plan"]
KEPT = {"curve_points.csv": "results/plan/curve_points.csv",
        "trials.csv": "results/resilience/trials.csv",
        "plan_summary.json": "results/plan/summary.json",
        "pretrain.json": "results/pretrain/metrics.json"}
WAFER = SETTINGS[1]         # the wafer fleet's default setting
PIPELINE = [*STAGES, "group", "fat", "compare"]
PIPELINE_KEPT = {**KEPT, "compare.json": "results/compare/metrics.json",
                 "per_chip.csv": "results/compare/per_chip.csv",
                 "group.json": "results/group/summary.json", "fleet.csv": "data/fleet/fleet.csv"}


def measure(network: str, seed: int, params: Path, sets: list[str], out: Path) -> dict:
    """One network and seed up to `plan` in a throw-away copy; keeps what the study reads."""
    if (out / "run.json").is_file():
        return json.loads((out / "run.json").read_text())
    seconds = run_and_keep(f"efat-{network}{seed}-", STAGES,
                           [f"model.name={network}", f"train.seed={seed}", *sets], KEPT, out,
                           f"{network} seed {seed}", params=params)
    pre = json.loads((out / "pretrain.json").read_text())
    row = {"network": network, "seed": seed, "minutes": seconds / 60,
           "baseline_val": pre["val_accuracy"], "baseline_test": pre["test_accuracy"],
           "sets": sets}
    (out / "run.json").write_text(json.dumps(row))
    return row


def curve_points(out: Path, merge: list[Path], min_reached: float) -> pd.DataFrame:
    """The plan's curve points kept in `out`, with those of the runs under `merge` (same network
    and seed folder name) at rates `out` lacks; feasibility refitted over the merged rates as
    planning.aggregate_needs fits it."""
    frames = [pd.read_csv(p) for p in [out / "curve_points.csv",
                                       *(m / out.name / "curve_points.csv" for m in merge)]
              if p.is_file()]
    points = (pd.concat(frames).drop_duplicates("fault_rate", keep="first")
              .sort_values("fault_rate").reset_index(drop=True))
    if len(frames) == 1:
        return points
    points["reach_fraction"], points["reach_fitted"], points["needed"] = feasible_needs(
        points["fault_rate"], points["reached_need"], points["n_reps"], points["n_never"],
        min_reached)
    return points


def fleet_bound(points: pd.DataFrame, rates: np.ndarray, study: dict) -> float:
    """The lower bound for any grouping of independent maps of these rates on the plan's curve
    (as grouping_ratios takes it): planned epochs of groups / per chip, chips the plan trains."""
    curve, planned_at, _ = fused_plan(points, study["plan"]["budget_cap"],
                                      study["resilience"]["checkpoint_every"],
                                      study["plan"]["safety_margin"])
    own = planned_at(rates)
    keep = np.isfinite(own) & (own > 0)
    rates, own = rates[keep], own[keep]
    return max(independent_bound(planned_at, rates, own, curve.max_feasible_rate),
               share_bound(planned_at, rates, own, curve.max_feasible_rate))


def pipeline(network: str, seed: int, params: Path, sets: list[str], out: Path,
             study: dict) -> dict:
    """The whole pipeline with grouping for one network and seed (kept in `out`, not run again
    when kept): eFAT's trained epochs against Reduce's and against the bound on its fleet."""
    if not (out / "run.json").is_file():
        seconds = run_and_keep(f"efat-pipe-{network}{seed}-", PIPELINE,
                               [f"model.name={network}", f"train.seed={seed}", *sets],
                               PIPELINE_KEPT, out, f"{network} seed {seed}", params=params)
        (out / "run.json").write_text(json.dumps({"minutes": seconds / 60}))
    policies = json.loads((out / "compare.json").read_text())["policies"]
    reduce_name = f"reduce-{study['plan']['statistic']}"
    reduce, efat = policies[reduce_name], policies["efat"]
    chips = pd.read_csv(out / "per_chip.csv").set_index(["policy", "chip_id"]).sort_index()
    same = {what: bool((chips.loc["efat", col].astype(bool)
                        == chips.loc[reduce_name, col].astype(bool)).all())
            for what, col in (("same_shipped", "shipped"), ("same_meet_on_test", "meets_on_test"))}
    generator = study["faultmaps"]["generator"]
    bound = (fleet_bound(pd.read_csv(out / "curve_points.csv"),
                         pd.read_csv(out / "fleet.csv")["fault_rate"].to_numpy(), study)
             if generator == "uniform" else float("nan"))
    pre = json.loads((out / "pretrain.json").read_text())
    ratio = efat["total_epochs"] / reduce["total_epochs"]
    return {"network": network, "seed": seed, "fleet": generator,
            "baseline_test": pre["test_accuracy"],
            "efat_epochs": efat["total_epochs"], "reduce_epochs": reduce["total_epochs"],
            "trained_ratio": ratio,
            "planned_ratio": json.loads((out / "group.json").read_text())["epochs_ratio"],
            "bound": bound, "above_bound": ratio - bound,
            "shipped_efat": efat["n_shipped"], "shipped_reduce": reduce["n_shipped"],
            "meet_on_test_efat": efat["n_meet_on_test"],
            "meet_on_test_reduce": reduce["n_meet_on_test"], **same,
            "minutes": json.loads((out / "run.json").read_text())["minutes"]}


CONCAVITY_AT = (0.1, 0.15, 0.2, 0.25)     # r of need(2r) / (2 need(r))


def concavity(points: pd.DataFrame, study: dict, r: float) -> float:
    """need(2r) / (2 need(r)) on the plan's fitted curve: inf where nothing is needed at r but
    something at 2r, NaN where 2r is beyond the plan's edge or nothing is needed at either."""
    curve = fused_plan(points, study["plan"]["budget_cap"],
                       study["resilience"]["checkpoint_every"],
                       study["plan"]["safety_margin"])[0]
    lo, hi = curve(np.array([r, 2 * r]))
    if not np.isfinite(hi) or hi == 0:
        return float("nan")
    return float(hi / (2 * lo)) if lo > 0 else float("inf")


def network_summary(network: str, runs: list[dict], outs: list[Path], study: dict,
                    fleets: int, merge: list[Path]) -> dict:
    """One network over its seeds: needs, concavity, grouping bound and ratios, cost."""
    row: dict = {"network": network, "seeds": len(runs),
                 "baseline_test": spread([r["baseline_test"] for r in runs]),
                 "minutes_per_run": float(np.mean([r["minutes"] for r in runs]))}
    parts = []
    for out in outs:
        points = curve_points(out, merge, study["plan"]["min_reached"])
        parts.append(points)
        for r in CONCAVITY_AT:
            row.setdefault(f"concavity_{r:g}", []).append(concavity(points, study, r))
        fleets_rows = grouping_ratios(points, study, fleets, 100, 0, [SETTINGS[0], WAFER])
        for name, ratios in zip(("uniform", "wafer"), fleets_rows):
            row.setdefault(f"{name}_refined", []).extend(ratios["refined"])
            if ratios["bound"]:
                row.setdefault("uniform_bound", []).extend(ratios["bound"])
    for key in [k for k, v in row.items() if isinstance(v, list)]:
        known = [v for v in row[key] if not np.isnan(v)]
        infinite = sum(np.isinf(v) for v in known)
        row[key] = " ".join(filter(None, [spread([v for v in known if np.isfinite(v)])
                                          if len(known) > infinite else "",
                                          f"inf in {infinite} seed(s)" if infinite else ""]))
    needs = pd.concat(parts).groupby("fault_rate")["needed"]
    row["needs"] = {f"{rate:g}": (float(g.replace(np.inf, np.nan).mean()),
                                  int(np.isfinite(g).sum())) for rate, g in needs}
    return row


def need_figure(outs: dict[str, list[Path]], path: Path, merge: list[Path],
                min_reached: float, data: str) -> None:
    """One curve per network: the plan's need (its statistic over the repetitions that reached,
    mean over seeds), the band from the least to the most any repetition needed."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for network, dirs in outs.items():
        table = pd.concat([curve_points(d, merge, min_reached) for d in dirs])
        table = table[np.isfinite(table["needed"])]
        if table.empty:
            continue
        g = table.groupby("fault_rate")
        mean = g["needed"].mean()
        lo, hi = g["min"].min(), g["max"].max()
        reps = int(table["n_reps"].max())
        line, = ax.plot(mean.index, mean.values, "o-",
                        label=f"{network} ({len(dirs)} seed{'s' * (len(dirs) > 1)}, "
                              f"{reps} repetitions per rate)")
        finite = np.isfinite(hi.values)
        ax.fill_between(mean.index[finite], lo.values[finite], hi.values[finite],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("fault rate (fraction of PEs faulty)")
    ax.set_ylabel("epochs of FAT needed")
    ax.set_title(f"Retraining need per network on {data} (mean; band: min–max over the "
                 "repetitions)\n"
                 "faster than linear: a fused map costs more than its members; saturating: "
                 "grouping can save", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--networks", nargs="+",
                        default=["lenet", "lenet-bn", "mlp", "vgg11", "resnet18"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--params", type=Path, default=REPO / "params-efat-study.yaml")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fleets", type=int, default=3, help="fleet seeds per grouping setting")
    parser.add_argument("--report-only", action="store_true", help="only the runs kept in OUT")
    parser.add_argument("--merge", type=Path, action="append", default=[], metavar="DIR",
                        help="kept runs whose curve points at other rates are added (see above)")
    parser.add_argument("--pipeline", action="store_true",
                        help="the whole pipeline with grouping per network and seed (see above)")
    args = parser.parse_args()
    study = yaml.safe_load(args.params.read_text())
    for item in args.sets:          # what grouping reads of the params (plan, fleet, array)
        key, _, value = item.partition("=")
        node = study
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = yaml.safe_load(value)
    if args.pipeline:
        pipelines(args, study)
        return
    runs: dict[str, list[dict]] = {}
    outs: dict[str, list[Path]] = {}
    for network in args.networks:
        for seed in args.seeds:
            out = args.out / f"{network}-seed{seed}"
            if args.report_only and not (out / "run.json").is_file():
                continue
            row = measure(network, seed, args.params, args.sets, out)
            print(json.dumps(row), flush=True)
            runs.setdefault(network, []).append(row)
            outs.setdefault(network, []).append(out)
    rows = [network_summary(n, runs[n], outs[n], study, args.fleets, args.merge) for n in runs]
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "summary.csv", index=False)
    need_figure(outs, args.out / "need_curves.png", args.merge, study["plan"]["min_reached"],
                study["data"]["source"])
    with pd.option_context("display.width", 250, "display.max_colwidth", 200):
        print(table.drop(columns=["needs"]).to_string(index=False))
        for r in rows:
            print(r["network"], "need by rate (mean epochs, seeds reached):", r["needs"])
    print(f"-> {args.out / 'summary.csv'}, {args.out / 'need_curves.png'}")


def pipelines(args: argparse.Namespace, study: dict) -> None:
    """--pipeline: each network and seed's run, one JSON line each, then a table."""
    rows = []
    for network in args.networks:
        for seed in args.seeds:
            out = (args.out / f"pipeline-{network}-{study['faultmaps']['generator']}"
                   f"-seed{seed}")
            rows.append(pipeline(network, seed, args.params, args.sets, out, study))
            print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "pipeline.csv", index=False)
    with pd.option_context("display.width", 250):
        print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"-> {args.out / 'pipeline.csv'}")


if __name__ == "__main__":
    main()

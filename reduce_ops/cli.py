"""The `reduce-ops` command: one thin function per stage wiring config, I/O and tracking."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reduce_ops.config import Config, flatten, load_config, split_overrides
from reduce_ops.errors import ReduceOpsError


def _progress(**kwargs):  # noqa: ANN202 - a tqdm bar on stderr, quiet when not a terminal+CI
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kwargs)


# --------------------------------------------------------------------------- stages

def cmd_prepare(cfg: Config, args: argparse.Namespace) -> None:
    """Read the dataset source, write the seeded stratified split to paths.prepared."""
    from reduce_ops.data import prepare

    out = cfg.path("prepared")
    meta = prepare(cfg.data, cfg.path("raw"), out)
    sizes = ", ".join(f"{k} {v}" for k, v in meta["split_sizes"].items())
    print(f"prepared {meta['source']}: {sizes}; input {tuple(meta['input_shape'])}, "
          f"{meta['num_classes']} classes, hash {meta['dataset_hash'][:12]} -> {out}")


def cmd_pretrain(cfg: Config, args: argparse.Namespace) -> None:
    """Train the baseline until its validation accuracy plateaus; save it and log one run."""
    import torch

    from reduce_ops import reports
    from reduce_ops.data import load_prepared
    from reduce_ops.models import build_model, save_checkpoint
    from reduce_ops.tracking import stage_run
    from reduce_ops.training import evaluate, pretrain, resolve_device

    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    with stage_run(cfg.root, "pretrain", cfg.tracking.experiment) as run:
        run.log_params(flatten({k: cfg.to_dict()[k] for k in ("data", "model", "train")}))
        run.log_params({"dataset_hash": data.dataset_hash, "n_parameters": n_params,
                        "device": str(device)})
        run.set_tags({"reduce_ops.dataset_hash": data.dataset_hash})
        with _progress(total=cfg.train.max_epochs, desc=f"pretrain {cfg.model.name}",
                       unit="epoch") as bar:
            def on_epoch(rec) -> None:  # noqa: ANN001
                run.log_metrics({"train_loss": rec.train_loss, "val_accuracy": rec.val_accuracy,
                                 "val_loss": rec.val_loss, "epoch_seconds": rec.seconds},
                                step=rec.epoch)
                bar.update(1)
                bar.set_postfix(val_acc=f"{rec.val_accuracy:.4f}", loss=f"{rec.train_loss:.3f}")

            result = pretrain(model, data, cfg.train, device, on_epoch)
        test_acc, test_loss = evaluate(model, data.x["test"], data.y["test"], device=device)
        seconds = time.perf_counter() - t0
        metrics = {"test_accuracy": test_acc, "test_loss": test_loss,
                   "best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
                   "epochs_trained": len(result.history), "train_seconds": seconds}
        run.log_metrics(metrics)
        arch = {"name": cfg.model.name, "input_shape": list(data.input_shape),
                "num_classes": data.num_classes}
        info = {"dataset_hash": data.dataset_hash, "test_accuracy": test_acc,
                "best_epoch": result.best_epoch, "run_id": run.run_id}
        baseline = cfg.path("baseline")
        save_checkpoint(model, arch, info, baseline)
        metrics_path = cfg.path("results") / "pretrain" / "metrics.json"
        reports.write_json_atomic(metrics_path, {**metrics, "dataset_hash": data.dataset_hash,
                                         "model": cfg.model.name})
        run.log_artifact(metrics_path)
    print(f"baseline {cfg.model.name}: test accuracy {test_acc:.4f} after {len(result.history)} "
          f"epochs (best epoch {result.best_epoch}) in {seconds:.1f} s -> {baseline}; "
          f"MLflow run {run.run_id}")


def cmd_faultmaps(cfg: Config, args: argparse.Namespace) -> None:
    """Generate the fleet's fault maps, or import a test floor's maps, into paths.fleet."""
    from reduce_ops.hardware import (ArrayGeometry, generate_fleet, import_fault_maps,
                                     write_fleet)

    geometry = ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols)
    out = cfg.path("fleet")
    if getattr(args, "action", "generate") == "import":
        if not args.src:
            raise ReduceOpsError("faultmaps import: give the folder of .npy/.csv maps, "
                                 "e.g. reduce-ops faultmaps import floor/maps")
        maps = import_fault_maps(Path(args.src), geometry)
        how = f"imported from {args.src}"
    else:
        fm = cfg.faultmaps
        maps = generate_fleet(fm.n_chips, geometry, fm.generator, fm.rate_distribution,
                              fm.rate_min, fm.rate_max, fm.seed, id_prefix=fm.id_prefix)
        how = f"{fm.generator} defects, rates {fm.rate_distribution} in [{fm.rate_min:g}, {fm.rate_max:g}]"
    write_fleet(maps, out)
    rates = [m.fault_rate for m in maps]
    print(f"fleet of {len(maps)} chips on a {geometry.rows}x{geometry.cols} array ({how}); "
          f"fault rate {min(rates):.3f}..{max(rates):.3f} -> {out}")


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cmd_resilience(cfg: Config, args: argparse.Namespace) -> None:
    """Step 1 of Reduce: every (fault rate, repetition) trial as an MLflow child run + the map."""
    from reduce_ops import reports, resilience
    from reduce_ops.data import load_prepared
    from reduce_ops.models import load_checkpoint
    from reduce_ops.planning import constraint_level, resilience_map
    from reduce_ops.tracking import (ensure_store, find_runs, read_children, stage_run,
                                     tracking_uri)
    from reduce_ops.training import evaluate, resolve_device

    t0 = time.perf_counter()
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, ckpt = load_checkpoint(cfg.path("baseline"), device)
    if ckpt["info"].get("dataset_hash") != data.dataset_hash:
        raise ReduceOpsError(f"{cfg.path('baseline')} was trained on another dataset than "
                             f"{cfg.path('prepared')}; run `reduce-ops pretrain` again")
    baseline_hash = _file_sha256(cfg.path("baseline"))
    base_test, _ = evaluate(baseline, data.x["test"], data.y["test"], device=device)
    base_val, _ = evaluate(baseline, data.x["val"], data.y["val"], device=device)
    level = constraint_level(cfg.constraint.kind, cfg.constraint.value, base_test)
    res = cfg.resilience
    specs = resilience.trial_grid(res)
    ghash = resilience.grid_hash(res, cfg.fat, cfg.hardware, baseline_hash, data.dataset_hash)

    # Finished trials of an interrupted run with the same grid, baseline and data are reused.
    uri = tracking_uri(cfg.root)
    ensure_store(uri)
    reusable: dict[str, resilience.TrialResult] = {}
    for old in find_runs(uri, {"reduce_ops.grid_hash": ghash}, statuses=("KILLED", "FAILED")):
        for child in read_children(uri, old.info.run_id,
                                   ["val_accuracy", "test_accuracy", "trial_seconds"]):
            trial = resilience.trial_from_run(child)
            reusable.setdefault(trial.spec.key, trial)

    out_dir = cfg.path("results") / "resilience"
    with stage_run(cfg.root, "resilience", cfg.tracking.experiment) as run:
        run.set_tags({"reduce_ops.grid_hash": ghash, "reduce_ops.baseline_hash": baseline_hash,
                      "reduce_ops.dataset_hash": data.dataset_hash})
        run.log_params(flatten({k: cfg.to_dict()[k] for k in
                                ("resilience", "fat", "hardware", "constraint")}))
        run.log_params({"baseline_hash": baseline_hash, "dataset_hash": data.dataset_hash,
                        "n_trials": len(specs), "checkpoints": resilience.checkpoint_amounts(res),
                        "device": str(device)})
        run.log_metrics({"baseline_test_accuracy": base_test, "baseline_val_accuracy": base_val,
                         "constraint_level": level})

        def log_trial(result: resilience.TrialResult) -> None:
            params, history, tags = resilience.trial_run_payload(result)
            run.child_run(f"trial {result.spec.key}", params, history, tags)

        reused = sum(1 for s in specs if s.key in reusable)
        with _progress(total=len(specs), desc="resilience trials", unit="trial") as bar:
            results = resilience.run_trials(baseline, data, specs, res, cfg.fat, cfg.hardware,
                                            device, reusable, log_trial, bar)
        trials = resilience.trials_table(results)
        levels = sorted(set(res.accuracy_levels) | {round(level, 6)})
        res_map = resilience_map(trials, levels, metric=cfg.plan.metric,
                                 crossing=cfg.plan.crossing)
        out_dir.mkdir(parents=True, exist_ok=True)
        reports.write_csv_atomic(trials, out_dir / "trials.csv")
        reports.write_csv_atomic(res_map, out_dir / "resilience_map.csv")
        reports.plot_accuracy_vs_fault_rate(trials, out_dir / "accuracy_vs_fault_rate.png",
                                            metric="test_accuracy", baseline=base_test,
                                            constraint=level)
        reports.plot_retraining_needed(res_map, out_dir / "retraining_needed.png",
                                       max_amount=res.max_epochs, constraint_level=level)
        seconds = time.perf_counter() - t0
        summary = {"n_trials": len(specs), "n_reused": reused, "baseline_test_accuracy": base_test,
                   "constraint_level": level, "stage_seconds": seconds,
                   "tracking_seconds": run.tracking_seconds,
                   "tracking_fraction": run.tracking_seconds / seconds, "run_id": run.run_id}
        reports.write_json_atomic(out_dir / "summary.json", summary)
        run.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        run.log_artifacts(out_dir)
    print(f"resilience: {len(specs)} trials ({reused} reused from an interrupted run) in "
          f"{seconds:.0f} s, MLflow logging {100 * run.tracking_seconds / seconds:.1f}% of it; "
          f"baseline test accuracy {base_test:.4f}, constraint {level:.4f} -> {out_dir}; "
          f"MLflow run {run.run_id}")


def _baseline_identity(cfg: Config) -> tuple[str, str]:
    """(baseline file sha256, dataset hash) of the current baseline and prepared data."""
    from reduce_ops.data import META_FILE

    baseline = cfg.path("baseline")
    meta_path = cfg.path("prepared") / META_FILE
    if not baseline.is_file():
        raise ReduceOpsError(f"{baseline}: no baseline model; run `reduce-ops pretrain` first")
    if not meta_path.is_file():
        raise ReduceOpsError(f"{meta_path}: no prepared dataset; run `reduce-ops prepare` first")
    return _file_sha256(baseline), json.loads(meta_path.read_text())["dataset_hash"]


@dataclass(frozen=True)
class ResilienceSource:
    """The logged resilience trials a plan is made from, and what they were measured for."""

    run: Any
    trials: Any            # pandas DataFrame, the long trials table
    level: float           # accuracy constraint, absolute
    baseline_accuracy: float
    granularity: float     # checkpoint spacing of the trials, in epochs
    fleet: list            # FaultMap per chip
    baseline_hash: str
    dataset_hash: str

    @property
    def chips(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"chip_id": [m.chip_id for m in self.fleet],
                             "fault_rate": [m.fault_rate for m in self.fleet]})


def _resilience_source(cfg: Config) -> ResilienceSource:
    """Read the trials back from MLflow: plan.resilience_run, or the latest finished matching run."""
    from reduce_ops import resilience
    from reduce_ops.errors import TrackingError
    from reduce_ops.hardware import ArrayGeometry, load_fleet
    from reduce_ops.planning import constraint_level
    from reduce_ops.tracking import find_runs, get_run, read_children, tracking_uri

    baseline_hash, dataset_hash = _baseline_identity(cfg)
    uri = tracking_uri(cfg.root)
    if cfg.plan.resilience_run:
        source = get_run(uri, cfg.plan.resilience_run)
    else:
        found = find_runs(uri, {"reduce_ops.stage": "resilience",
                                "reduce_ops.baseline_hash": baseline_hash,
                                "reduce_ops.dataset_hash": dataset_hash}, statuses=("FINISHED",))
        if not found:
            raise TrackingError(f"no finished resilience run for this baseline and dataset in "
                                f"{uri}; run `reduce-ops resilience` first (or set "
                                f"plan.resilience_run)")
        source = found[0]
    children = read_children(uri, source.info.run_id, ["val_accuracy", "test_accuracy"])
    if not children:
        raise TrackingError(f"resilience run {source.info.run_id} has no finished trials")
    trials = resilience.trials_table([resilience.trial_from_run(c) for c in children])
    base_acc = source.data.metrics["baseline_test_accuracy"]
    level = constraint_level(cfg.constraint.kind, cfg.constraint.value, base_acc)
    fleet = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    granularity = float(source.data.params.get("resilience.checkpoint_every",
                                               cfg.resilience.checkpoint_every))
    return ResilienceSource(source, trials, level, base_acc, granularity, fleet, baseline_hash,
                            dataset_hash)


def cmd_plan(cfg: Config, args: argparse.Namespace) -> None:
    """Step 2 of Reduce: fit retraining-needed(fault rate) over the LOGGED trials, plan each chip."""
    from reduce_ops import reports
    from reduce_ops.planning import make_plan
    from reduce_ops.tracking import stage_run

    src = _resilience_source(cfg)
    source, trials, level, chips = src.run, src.trials, src.level, src.chips
    granularity, base_acc = src.granularity, src.baseline_accuracy
    baseline_hash, dataset_hash = src.baseline_hash, src.dataset_hash
    result = make_plan(trials, chips, level, cfg.plan.statistic, cfg.plan.metric, granularity,
                       cfg.plan.safety_margin, cfg.plan.crossing)
    plan = result.plan
    out_dir = cfg.path("results") / "plan"
    with stage_run(cfg.root, "plan", cfg.tracking.experiment) as run:
        run.set_tags({"reduce_ops.resilience_run": source.info.run_id,
                      "reduce_ops.baseline_hash": baseline_hash,
                      "reduce_ops.dataset_hash": dataset_hash})
        run.log_params(flatten({k: cfg.to_dict()[k] for k in ("plan", "constraint")}))
        run.log_params({"resilience_run_id": source.info.run_id, "granularity": granularity,
                        "n_chips": len(chips)})
        feasible = plan[plan["feasible"]]
        summary = {"run_id": run.run_id, "resilience_run_id": source.info.run_id,
                   "constraint_level": level, "baseline_test_accuracy": base_acc,
                   "statistic": cfg.plan.statistic, "n_chips": len(plan),
                   "n_feasible": int(len(feasible)), "n_infeasible": int((~plan["feasible"]).sum()),
                   "total_planned_epochs": float(feasible["planned_epochs"].sum()),
                   "max_feasible_rate": float(result.curve.max_feasible_rate),
                   "baseline_hash": baseline_hash, "dataset_hash": dataset_hash}
        out_dir.mkdir(parents=True, exist_ok=True)
        reports.write_csv_atomic(plan, out_dir / "plan.csv")
        reports.write_csv_atomic(result.points, out_dir / "curve_points.csv")
        reports.plot_plan_curve(result.points, result.curve, plan, out_dir / "plan_curve.png",
                                statistic=cfg.plan.statistic, constraint_level=level)
        reports.write_json_atomic(out_dir / "summary.json", summary)
        run.log_metrics({k: v for k, v in summary.items()
                         if isinstance(v, (int, float)) and abs(v) != float("inf")})
        run.log_artifacts(out_dir)
    print(f"plan: {summary['n_feasible']}/{len(plan)} chips feasible for accuracy >= {level:.4f} "
          f"({cfg.plan.statistic} over repetitions), {summary['total_planned_epochs']:g} epochs "
          f"in all, reachable up to fault rate {result.curve.max_feasible_rate:g} -> {out_dir}; "
          f"from resilience run {source.info.run_id}")


def cmd_fat(cfg: Config, args: argparse.Namespace) -> None:
    """Step 3 of Reduce: FAT per chip as planned, one child run + one registered model per chip."""
    from tqdm.auto import tqdm

    from reduce_ops import fleet, reports
    from reduce_ops.data import load_prepared
    from reduce_ops.hardware import ArrayGeometry, load_fleet
    from reduce_ops.models import load_checkpoint
    from reduce_ops.tracking import stage_run, tracking_uri
    from reduce_ops.training import resolve_device

    t0 = time.perf_counter()
    plan_dir = cfg.path("results") / "plan"
    plan, plan_info = fleet.read_plan(plan_dir)
    baseline_hash, dataset_hash = _baseline_identity(cfg)
    if (plan_info.baseline_hash, plan_info.dataset_hash) != (baseline_hash, dataset_hash):
        raise ReduceOpsError(f"{plan_dir}: the plan was made for another baseline or dataset; "
                             f"run `reduce-ops resilience` and `reduce-ops plan` again")
    maps = load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    jobs = fleet.chip_jobs(plan, maps, plan_dir / "plan.csv")
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, ckpt = load_checkpoint(cfg.path("baseline"), device)
    ctx = fleet.FleetContext(plan_info, cfg.fat, cfg.hardware.layer_types, device,
                             cfg.registry.prefix, tracking_uri(cfg.root), dict(ckpt["arch"]),
                             data.x["test"][:2].numpy(), force=getattr(args, "force", False),
                             warn=lambda line: tqdm.write(line, file=sys.stderr))
    out_dir = cfg.path("results") / "fat"
    with stage_run(cfg.root, "fat", cfg.tracking.experiment) as run:
        run.set_tags({"reduce_ops.plan_run_id": plan_info.run_id,
                      "reduce_ops.baseline_hash": baseline_hash,
                      "reduce_ops.dataset_hash": dataset_hash})
        run.log_params(flatten({k: cfg.to_dict()[k] for k in ("fat", "hardware", "registry")}))
        run.log_params({"plan_run_id": plan_info.run_id, "n_chips": len(jobs),
                        "constraint_level": plan_info.constraint_level,
                        "force": getattr(args, "force", False), "device": str(device)})
        with _progress(total=len(jobs), desc="fat", unit="chip") as bar:
            outcomes = fleet.run_fleet(run, jobs, baseline, data, ctx, bar)
        seconds = time.perf_counter() - t0
        summary = {**fleet.fleet_summary(outcomes, plan_info), "run_id": run.run_id,
                   "stage_seconds": seconds, "tracking_seconds": run.tracking_seconds}
        out_dir.mkdir(parents=True, exist_ok=True)
        reports.write_csv_atomic(fleet.chips_table(outcomes), out_dir / "chips.csv")
        reports.write_json_atomic(out_dir / "summary.json", summary)
        run.log_metrics({k: v for k, v in summary.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run.log_artifacts(out_dir)
    missed = (f"; missed the constraint (registered, no champion from this plan): "
              f"{', '.join(summary['missed_constraint'])}" if summary["missed_constraint"] else "")
    print(f"fat: {summary['n_passed']}/{summary['n_feasible']} feasible chips meet accuracy >= "
          f"{plan_info.constraint_level:.4f} ({summary['n_chips']} in the fleet, "
          f"{summary['n_rejected']} rejected); trained {summary['n_trained']} "
          f"({summary['trained_epochs']:g} epochs), skipped {summary['n_skipped']} already "
          f"registered for plan {plan_info.run_id}, in {seconds:.0f} s{missed} -> {out_dir}; "
          f"MLflow run {run.run_id}")


def cmd_fetch(cfg: Config, args: argparse.Namespace) -> None:
    """Show a chip's champion model (URI, version, accuracy); with --out, download it."""
    from reduce_ops import fleet
    from reduce_ops.tracking import tracking_uri

    uri = tracking_uri(cfg.root)
    mv = fleet.champion(uri, cfg.registry.prefix, args.chip_id)
    tags = mv.tags
    print(f"{args.chip_id}: models:/{mv.name}@{fleet.CHAMPION} = version {mv.version}; test "
          f"accuracy {float(tags.get('test_accuracy', 'nan')):.4f} (constraint "
          f"{float(tags.get('constraint_level', 'nan')):.4f}), fault rate "
          f"{float(tags.get('fault_rate', 'nan')):.4f}, {tags.get('planned_epochs', '?')} epochs "
          f"of FAT, {tags.get('serialization_format', '?')} model; run {mv.run_id}")
    if args.out:
        out = fleet.download_champion(uri, mv, Path(args.out))
        print(f"downloaded -> {out}/model (MLflow model) and {out}/{fleet.CHIP_MODEL_FILE} "
              f"(state_dict + arch)")


def cmd_compare(cfg: Config, args: argparse.Namespace) -> None:
    """Fixed-epoch policies vs Reduce on the fleet (Fig. 3), from one FAT run per chip."""
    from reduce_ops import compare, reports
    from reduce_ops.data import load_prepared
    from reduce_ops.models import load_checkpoint
    from reduce_ops.planning import make_plan
    from reduce_ops.tracking import stage_run
    from reduce_ops.training import resolve_device

    t0 = time.perf_counter()
    src = _resilience_source(cfg)
    plans = {f"reduce-{stat}": make_plan(src.trials, src.chips, src.level, stat, cfg.plan.metric,
                                         src.granularity, cfg.plan.safety_margin,
                                         cfg.plan.crossing).plan
             for stat in cfg.compare.statistics}
    chip_ids = [m.chip_id for m in src.fleet]
    policies = compare.policy_epochs(cfg.compare.fixed_epochs, plans, chip_ids)
    amounts = compare.amounts_per_chip(policies)
    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    baseline, _ = load_checkpoint(cfg.path("baseline"), device)
    out_dir = cfg.path("results") / "compare"
    with stage_run(cfg.root, "compare", cfg.tracking.experiment) as run:
        run.set_tags({"reduce_ops.resilience_run": src.run.info.run_id,
                      "reduce_ops.baseline_hash": src.baseline_hash,
                      "reduce_ops.dataset_hash": src.dataset_hash})
        run.log_params(flatten({k: cfg.to_dict()[k] for k in ("compare", "plan", "constraint",
                                                                 "fat")}))
        run.log_params({"resilience_run_id": src.run.info.run_id, "n_chips": len(chip_ids),
                        "constraint_level": src.level})
        curves = []
        with _progress(total=len(src.fleet), desc="compare chips", unit="chip") as bar:
            for fmap in src.fleet:
                bar.set_postfix(chip=fmap.chip_id, rate=f"{fmap.fault_rate:.3f}")
                curves.append(compare.run_chip(baseline, data, fmap, amounts[fmap.chip_id],
                                               cfg.fat, cfg.hardware, device))
                bar.update(1)
        per_chip = compare.per_chip_table(curves, policies, src.level)
        summary = compare.summarize(per_chip)
        for row in summary.itertuples(index=False):
            run.child_run(f"policy {row.policy}", {"policy": row.policy},
                          {"n_met": [(0, row.n_met)], "pass_rate": [(0, row.pass_rate)],
                           "n_rejected": [(0, row.n_rejected)],
                           "total_epochs": [(0, row.total_epochs)],
                           "total_seconds": [(0, row.total_seconds)]},
                          {"reduce_ops.policy": row.policy})
        trained = float(sum(max(a) for a in amounts.values()))
        separate = float(summary["total_epochs"].sum())
        out_dir.mkdir(parents=True, exist_ok=True)
        reports.write_csv_atomic(per_chip, out_dir / "per_chip.csv")
        reports.write_csv_atomic(summary, out_dir / "summary.csv")
        reports.plot_policy_comparison(per_chip, summary, out_dir / "policies.png", src.level)
        metrics = {"constraint_level": src.level, "n_chips": len(chip_ids),
                   "epochs_trained": trained, "epochs_if_one_run_per_policy": separate,
                   "stage_seconds": time.perf_counter() - t0,
                   "policies": {r.policy: {"n_met": r.n_met, "pass_rate": r.pass_rate,
                                           "total_epochs": r.total_epochs,
                                           "n_rejected": r.n_rejected}
                                for r in summary.itertuples(index=False)}}
        reports.write_json_atomic(out_dir / "metrics.json", metrics)
        run.log_metrics({"epochs_trained": trained, "epochs_if_one_run_per_policy": separate})
        run.log_artifacts(out_dir)
    lines = [f"  {r.policy:>14}: {r.n_met:>4}/{r.n_chips} chips meet {src.level:.4f} "
             f"({100 * r.pass_rate:.0f}%), {r.total_epochs:g} epochs, {r.n_rejected} rejected"
             for r in summary.itertuples(index=False)]
    print("compare:\n" + "\n".join(lines) + f"\n  trained {trained:g} epochs instead of "
          f"{separate:g} (one run per chip) -> {out_dir}; MLflow run {run.run_id}")


PIPELINE = ("prepare", "faultmaps", "pretrain", "resilience", "plan", "fat", "compare")


def cmd_main(cfg: Config, args: argparse.Namespace) -> None:
    """The whole pipeline in one MLflow run, each step a child run beneath it (no caching:
    `dvc repro` is the cached way)."""
    from reduce_ops.tracking import stage_run

    t0 = time.perf_counter()
    with stage_run(cfg.root, "main", cfg.tracking.experiment) as run:
        run.log_params({"steps": ",".join(PIPELINE), "params_file": cfg.source})
        for step in PIPELINE:
            print(f"== {step}", flush=True)
            STAGES[step][0](cfg, args)
        run.log_metrics({"pipeline_seconds": time.perf_counter() - t0})
    print(f"pipeline finished in {time.perf_counter() - t0:.0f} s; MLflow run {run.run_id}")


STAGES: dict[str, tuple[Callable[[Config, argparse.Namespace], None], str]] = {
    "prepare": (cmd_prepare, "read the dataset, write the seeded stratified split"),
    "faultmaps": (cmd_faultmaps, "generate the fleet's fault maps, or `faultmaps import DIR`"),
    "pretrain": (cmd_pretrain, "train the baseline model to convergence"),
    "resilience": (cmd_resilience, "measure accuracy after k epochs of FAT at each fault rate"),
    "plan": (cmd_plan, "plan each chip's retraining from the logged resilience"),
    "fat": (cmd_fat, "retrain every chip as planned, register one model per chip"),
    "compare": (cmd_compare, "fixed-epoch policies vs Reduce on the fleet (Fig. 3)"),
    "main": (cmd_main, "the whole pipeline, one MLflow run with a child per step"),
    "fetch": (cmd_fetch, "show a chip's champion model, `fetch CHIP_ID --out DIR` downloads it"),
}


# --------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="parameters file (default: params.yaml)")
    common.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set train.max_epochs=3 (repeatable)")
    common.add_argument("--overrides", default="", metavar="'K=V K=V'",
                        help="several overrides in one string (used by MLproject entry points)")
    parser = argparse.ArgumentParser(
        prog="reduce-ops",
        description="Plan, run and track fault-aware retraining of one DNN for a fleet of faulty "
                    "systolic-array chips. Every stage reads params.yaml; --set KEY=VALUE "
                    "overrides any key.")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    parsers = {name: sub.add_parser(name, parents=[common], help=help_text,
                                    description=help_text)
               for name, (_, help_text) in STAGES.items()}
    fm = parsers["faultmaps"]
    fm.add_argument("action", nargs="?", choices=["generate", "import"], default="generate",
                    help="generate from params (default) or import a test floor's maps")
    fm.add_argument("src", nargs="?", help="import: folder of <chip_id>.npy / <chip_id>.csv maps")
    parsers["fat"].add_argument("--force", action="store_true",
                                help="retrain chips already registered for the current plan")
    fetch = parsers["fetch"]
    fetch.add_argument("chip_id", help="chip id as in the fleet, e.g. chip-007")
    fetch.add_argument("--out", metavar="DIR",
                       help="download the champion's MLflow model and chip_model.pt into DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; bad input ends with one line on stderr and exit code 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.params, [*split_overrides(args.overrides), *args.sets])
        STAGES[args.stage][0](cfg, args)
    except ReduceOpsError as exc:
        print(f"reduce-ops {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"reduce-ops {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

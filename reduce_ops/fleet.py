"""Step 3 of Reduce: per-chip fault-aware training, one registered model per chip, fetch by id."""

from __future__ import annotations

import difflib
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from reduce_ops import tracking
from reduce_ops.config import FatConfig
from reduce_ops.errors import DataError, TrackingError
from reduce_ops.hardware import FaultMap, pruned_fraction
from reduce_ops.planning import PLAN_COLUMNS

CHAMPION = "champion"               # alias of the version a chip ships with
CHIP_MODEL_FILE = "chip_model.pt"   # state_dict + arch (save_checkpoint), trainable
PLAN_ID_TAG = "plan_run_id"         # version tag that makes a rerun skip a chip
CHIP_COLUMNS = ("chip_id", "fault_rate", "planned_epochs", "test_accuracy", "val_accuracy",
                "constraint_met", "pruned_fraction", "model_version", "champion_version",
                "run_id", "status", "serialization_format", "train_seconds", "log_model_seconds")
RATE_TOL = 1e-9             # plan vs fleet fault rates: the same float, up to repr


def registered_name(prefix: str, chip_id: str) -> str:
    """The registered model of a chip: <prefix>-<chip_id>."""
    return f"{prefix}-{chip_id}"


# --------------------------------------------------------------------------- plan -> jobs

@dataclass(frozen=True)
class PlanInfo:
    """What `fat` needs from the plan stage's summary.json."""

    run_id: str
    constraint_level: float
    baseline_hash: str
    dataset_hash: str


@dataclass(frozen=True)
class ChipJob:
    """One chip to retrain: its plan row joined with its fault map."""

    chip_id: str
    fault_rate: float
    planned_epochs: float      # NaN when infeasible
    feasible: bool
    reason: str
    fault_map: FaultMap


def read_plan(plan_dir: Path) -> tuple[pd.DataFrame, PlanInfo]:
    """plan.csv + summary.json of the plan stage, checked; one clear line when missing/broken."""
    csv_path, summary_path = plan_dir / "plan.csv", plan_dir / "summary.json"
    for path in (csv_path, summary_path):
        if not path.is_file():
            raise DataError(f"{path}: no plan; run `reduce-ops plan` first")
    try:
        plan = pd.read_csv(csv_path, dtype={"chip_id": str, "reason": str},
                           keep_default_na=False, na_values=[""])
        summary = json.loads(summary_path.read_text())
        info = PlanInfo(str(summary["run_id"]), float(summary["constraint_level"]),
                        str(summary.get("baseline_hash", "")), str(summary.get("dataset_hash", "")))
    except (ValueError, KeyError, TypeError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{plan_dir}: unreadable plan ({type(exc).__name__}: {exc})") from None
    missing = [c for c in PLAN_COLUMNS if c not in plan.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}")
    plan["feasible"] = plan["feasible"].astype(str).str.lower().isin(("true", "1"))
    bad = plan["feasible"] & ~np.isfinite(plan["planned_epochs"].astype(float))
    if bad.any():
        raise DataError(f"{csv_path}: feasible chip {plan.loc[bad, 'chip_id'].iloc[0]!r} "
                        f"has no planned_epochs")
    return plan, info


def chip_jobs(plan: pd.DataFrame, fleet: Sequence[FaultMap], plan_path: Path) -> list[ChipJob]:
    """Join plan rows with the fleet's maps; a plan that does not match the fleet is stale."""
    maps = {m.chip_id: m for m in fleet}
    planned = set(plan["chip_id"])
    if planned != set(maps):
        extra = sorted(planned - set(maps))[:3]
        absent = sorted(set(maps) - planned)[:3]
        what = (f"chips not in the fleet: {', '.join(extra)}" if extra
                else f"fleet chips not planned: {', '.join(absent)}")
        raise DataError(f"{plan_path}: the plan does not match the fleet ({what}); "
                        f"run `reduce-ops plan` again")
    jobs = []
    for row in plan.itertuples(index=False):
        fault_map = maps[row.chip_id]
        if abs(fault_map.fault_rate - float(row.fault_rate)) > RATE_TOL:
            raise DataError(f"{plan_path}: chip {row.chip_id!r} planned at fault rate "
                            f"{float(row.fault_rate):g}, its map has {fault_map.fault_rate:g}; "
                            f"run `reduce-ops plan` again")
        jobs.append(ChipJob(row.chip_id, fault_map.fault_rate, float(row.planned_epochs),
                            bool(row.feasible), "" if pd.isna(row.reason) else str(row.reason),
                            fault_map))
    return jobs


# --------------------------------------------------------------------------- one chip

@dataclass
class ChipTraining:
    """A chip's retrained model (on the CPU, eval mode), its masks and accuracy."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    test_accuracy: float
    val_accuracy: float
    pruned_fraction: float
    seconds: float             # FAT + evaluation wall time


def train_chip(baseline: nn.Module, job: ChipJob, data: Any, cfg: FatConfig,
               layer_types: Sequence[str], device: torch.device | str = "cpu") -> ChipTraining:
    """FAP with the chip's map, then FAT for the planned epochs (0 = none), then evaluate."""
    from reduce_ops.training import fap_then_fat, split_accuracies

    t0 = time.perf_counter()
    model, masks, _ = fap_then_fat(baseline, job.fault_map, layer_types, data,
                                   job.planned_epochs, cfg, device)
    acc = split_accuracies(model, data, device=device)
    return ChipTraining(model.cpu().eval(), masks, acc["test_accuracy"], acc["val_accuracy"],
                        pruned_fraction(masks), time.perf_counter() - t0)


@dataclass
class ChipOutcome:
    """One row of chips.csv."""

    chip_id: str
    fault_rate: float
    planned_epochs: float
    test_accuracy: float = math.nan
    val_accuracy: float = math.nan
    constraint_met: bool = False
    pruned_fraction: float = math.nan
    model_version: str = ""
    champion_version: str = ""
    run_id: str = ""
    status: str = ""           # trained | skipped | rejected
    serialization_format: str = ""
    train_seconds: float = 0.0
    log_model_seconds: float = 0.0


def _pip_requirements() -> list[str]:
    """What a pt2 model needs to load; explicit, so MLflow skips its slow inference."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def _skip(job: ChipJob, name: str, uri: str, plan_id: str) -> ChipOutcome | None:
    """The outcome of a chip already registered for this plan, or None when it still needs FAT."""
    done = tracking.find_model_versions(uri, name, {PLAN_ID_TAG: plan_id})
    if not done:
        return None
    champ = next((v for v in done if CHAMPION in v.aliases), None)
    mv = champ or done[0]
    tags = mv.tags
    return ChipOutcome(job.chip_id, job.fault_rate, job.planned_epochs,
                       float(tags.get("test_accuracy", "nan")),
                       float(tags.get("val_accuracy", "nan")),
                       tags.get("constraint_met") == "true",
                       float(tags.get("pruned_fraction", "nan")), mv.version,
                       _champion_version(uri, name), mv.run_id, "skipped",
                       tags.get("serialization_format", ""))


def _reject(stage: tracking.StageRun, job: ChipJob, plan_id: str) -> ChipOutcome:
    """An infeasible chip: a finished child run that says why, no training, no model."""
    params = {"chip_id": job.chip_id, "fault_rate": job.fault_rate, "plan_run_id": plan_id,
              "reason": job.reason or "infeasible"}
    run_id = stage.child_run(f"chip {job.chip_id}", params, {},
                             {"reduce_ops.chip_id": job.chip_id, "reduce_ops.rejected": "true",
                              "reduce_ops.plan_run_id": plan_id})
    return ChipOutcome(job.chip_id, job.fault_rate, job.planned_epochs, run_id=run_id,
                       status="rejected")


def _train_and_register(stage: tracking.StageRun, job: ChipJob, baseline: nn.Module, data: Any,
                        ctx: FleetContext) -> ChipOutcome:
    """FAT one chip, log it as a child run with its model, register it (+ champion if it passes)."""
    from reduce_ops.models import save_checkpoint

    trained = train_chip(baseline, job, data, ctx.fat, ctx.layer_types, ctx.device)
    met = trained.test_accuracy >= ctx.plan.constraint_level
    name = registered_name(ctx.prefix, job.chip_id)
    params = {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
              "n_faulty": job.fault_map.n_faulty, "pruned_fraction": trained.pruned_fraction,
              "planned_epochs": job.planned_epochs, "plan_run_id": ctx.plan.run_id,
              "constraint_level": ctx.plan.constraint_level}
    tags = {"reduce_ops.chip_id": job.chip_id, "reduce_ops.plan_run_id": ctx.plan.run_id}
    with tracking.model_child_run(stage, f"chip {job.chip_id}", params, tags) as child:
        child.log_metrics({"test_accuracy": trained.test_accuracy,
                           "val_accuracy": trained.val_accuracy,
                           "constraint_met": float(met), "wall_seconds": trained.seconds})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHIP_MODEL_FILE
            info = {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
                    "planned_epochs": job.planned_epochs, "test_accuracy": trained.test_accuracy,
                    "plan_run_id": ctx.plan.run_id, "dataset_hash": ctx.plan.dataset_hash,
                    "run_id": child.run_id}
            save_checkpoint(trained.model, ctx.arch, info, path)
            child.log_artifact(path)
        logged = child.log_pytorch_model(trained.model, ctx.input_example, _pip_requirements())
        child.log_metrics({"log_model_seconds": logged.seconds})
        child.set_tags({"reduce_ops.serialization_format": logged.serialization_format,
                        **({"reduce_ops.pt2_fallback": logged.fallback_reason}
                           if logged.fallback_reason else {})})
        version_tags = {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
                        "planned_epochs": job.planned_epochs,
                        "test_accuracy": trained.test_accuracy,
                        "val_accuracy": trained.val_accuracy,
                        "pruned_fraction": trained.pruned_fraction,
                        "constraint_level": ctx.plan.constraint_level,
                        PLAN_ID_TAG: ctx.plan.run_id, "constraint_met": str(met).lower(),
                        "serialization_format": logged.serialization_format}
        version = tracking.register_model_version(stage, name, logged, child.run_id,
                                                  version_tags, CHAMPION if met else None)
    if logged.fallback_reason:
        ctx.warn(f"chip {job.chip_id}: pt2 export failed ({logged.fallback_reason}); "
                 f"model logged in the pickle format")
    champion = version if met else _champion_version(ctx.uri, name)
    return ChipOutcome(job.chip_id, job.fault_rate, job.planned_epochs, trained.test_accuracy,
                       trained.val_accuracy, met, trained.pruned_fraction, version, champion,
                       child.run_id, "trained", logged.serialization_format, trained.seconds,
                       logged.seconds)


def _champion_version(uri: str, name: str) -> str:
    current = tracking.model_version_by_alias(uri, name, CHAMPION)
    return current.version if current else ""


# --------------------------------------------------------------------------- the fleet

@dataclass
class FleetContext:
    """Everything every chip shares: plan, training config, registry prefix, model arch."""

    plan: PlanInfo
    fat: FatConfig
    layer_types: Sequence[str]
    device: torch.device | str
    prefix: str
    uri: str
    arch: dict[str, Any]                  # build_model arguments, saved in chip_model.pt
    input_example: np.ndarray             # [2, C, H, W] float32 test images (pt2 tracing)
    force: bool = False
    warn: Callable[[str], None] = print


def run_fleet(stage: tracking.StageRun, jobs: Sequence[ChipJob], baseline: nn.Module, data: Any,
              ctx: FleetContext, bar: Any = None) -> list[ChipOutcome]:
    """Every chip in turn: skip if registered for this plan (unless force), reject if
    infeasible, else FAT + child run + registered version. `bar`: a tqdm-like progress bar."""
    outcomes = []
    for job in jobs:
        if bar is not None:
            bar.set_postfix_str(job.chip_id)
        name = registered_name(ctx.prefix, job.chip_id)
        outcome = None
        if not job.feasible:
            outcome = _reject(stage, job, ctx.plan.run_id)
        elif not ctx.force:
            outcome = _skip(job, name, ctx.uri, ctx.plan.run_id)
        if outcome is None:
            outcome = _train_and_register(stage, job, baseline, data, ctx)
        outcomes.append(outcome)
        if bar is not None:
            bar.update(1)
    return outcomes


def chips_table(outcomes: Sequence[ChipOutcome]) -> pd.DataFrame:
    """chips.csv: one row per chip in plan order."""
    return pd.DataFrame([asdict(o) for o in outcomes], columns=list(CHIP_COLUMNS))


def fleet_summary(outcomes: Sequence[ChipOutcome], plan: PlanInfo) -> dict[str, Any]:
    """Counts, epochs and the chips that ship without a champion from this plan."""
    feasible = [o for o in outcomes if o.status != "rejected"]
    trained = [o for o in outcomes if o.status == "trained"]
    missed = [o.chip_id for o in feasible if not o.constraint_met]
    log_s = sum(o.log_model_seconds for o in trained)
    return {
        "plan_run_id": plan.run_id, "constraint_level": plan.constraint_level,
        "n_chips": len(outcomes), "n_feasible": len(feasible),
        "n_passed": sum(o.constraint_met for o in feasible), "n_missed": len(missed),
        "n_trained": len(trained), "n_skipped": sum(o.status == "skipped" for o in outcomes),
        "n_rejected": len(outcomes) - len(feasible),
        "total_planned_epochs": float(sum(o.planned_epochs for o in feasible)),
        "trained_epochs": float(sum(o.planned_epochs for o in trained)),
        "train_seconds": sum(o.train_seconds for o in trained),
        "log_model_seconds": log_s,
        "log_model_seconds_per_chip": log_s / len(trained) if trained else 0.0,
        "missed_constraint": missed,
        "without_champion": [o.chip_id for o in feasible if not o.champion_version],
        "rejected": [o.chip_id for o in outcomes if o.status == "rejected"],
    }


# --------------------------------------------------------------------------- fetch

def champion(uri: str, prefix: str, chip_id: str) -> tracking.ModelVersionInfo:
    """The chip's champion version, or one TrackingError line (with close chip ids if unknown)."""
    name = registered_name(prefix, chip_id)
    found = tracking.model_version_by_alias(uri, name, CHAMPION)
    if found is not None:
        return found
    versions = tracking.find_model_versions(uri, name)
    if versions:
        raise TrackingError(f"chip {chip_id!r}: {len(versions)} version(s) of {name!r}, none met "
                            f"the accuracy constraint (no {CHAMPION!r} alias) in {uri}")
    rejected = tracking.find_runs(uri, {"reduce_ops.chip_id": chip_id,
                                        "reduce_ops.rejected": "true"})
    if rejected:
        reason = rejected[0].data.params.get("reason", "infeasible")
        raise TrackingError(f"chip {chip_id!r} has no model: the plan found it infeasible "
                            f"({reason})")
    known = [n[len(prefix) + 1:] for n in tracking.registered_model_names(uri, f"{prefix}-")]
    close = difflib.get_close_matches(chip_id, known, n=3, cutoff=0.6)
    if close:
        hint = f"; close matches: {', '.join(close)}"
    elif known:
        hint = f"; {len(known)} chips registered, e.g. {', '.join(known[:3])}"
    else:
        hint = "; no chip is registered yet: run `reduce-ops fat`"
    raise TrackingError(f"unknown chip id {chip_id!r}: no registered model {name!r} in {uri}{hint}")


def _prefix_from_params(root: Path) -> str:
    from reduce_ops.config import load_config

    return load_config(root / "params.yaml").registry.prefix


def load_chip_model(chip_id: str, tracking_uri: str | None = None,
                    prefix: str | None = None) -> nn.Module:
    """The chip's champion as a trainable nn.Module in eval mode (built from chip_model.pt).

    Defaults: the tracking URI and registry.prefix of the project whose params.yaml is in the
    current folder. `mlflow.pytorch.load_model("models:/<prefix>-<chip_id>@champion")` gives
    the same model as a pt2 GraphModule (inference only).
    """
    from reduce_ops.models import load_checkpoint

    root = Path.cwd()
    if prefix is None:
        prefix = _prefix_from_params(root)
    uri = tracking_uri or tracking.tracking_uri(root)
    version = champion(uri, prefix, chip_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_run_artifact(uri, version.run_id, CHIP_MODEL_FILE, Path(tmp))
        model, _ = load_checkpoint(path)
    return model


def download_champion(uri: str, version: tracking.ModelVersionInfo, out: Path) -> Path:
    """The champion's MLflow model folder (out/model) and chip_model.pt (out/) downloaded."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:   # same disk: the moves are renames
        model_dir, ckpt = tracking.download_model_version(uri, version, CHIP_MODEL_FILE,
                                                          Path(tmp))
        for src, dst in ((model_dir, out / "model"), (ckpt, out / CHIP_MODEL_FILE)):
            if dst.is_dir():
                shutil.rmtree(dst)
            src.replace(dst)
    return out

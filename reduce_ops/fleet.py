"""Step 3 of Reduce: per-chip fault-aware training, one registered model per chip, fetch by id."""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from reduce_ops import names, tracking
from reduce_ops.binomial import wilson_interval
from reduce_ops.config import FatConfig
from reduce_ops.errors import DataError, TrackingError
from reduce_ops.fault_aware import FatSession
from reduce_ops.hardware import FaultMap
from reduce_ops.names import CHAMPION, TEST_ACCURACY, VAL_ACCURACY, registered_name
from reduce_ops.planning import PLAN_COLUMNS, verify
from reduce_ops.progress import Progress

CHIP_MODEL_FILE = "chip_model.pt"   # state_dict + arch (save_checkpoint), trainable
RATE_TOL = 1e-9             # plan vs fleet fault rates: the same float, up to repr


# --------------------------------------------------------------------------- plan -> jobs

@dataclass(frozen=True)
class PlanInfo:
    """What `fat` needs from the plan stage's summary.json."""

    run_id: str
    decision_level: float      # validation accuracy a chip must reach to ship
    constraint_level: float    # test accuracy it is judged against (reported, not decided on)
    budget_cap: float          # epochs
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
        info = PlanInfo(str(summary["run_id"]), float(summary["decision_level"]),
                        float(summary["constraint_level"]), float(summary["budget_cap"]),
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

SHIPPED, REJECTED = "shipped", "rejected"


@dataclass
class ChipOutcome:
    """One row of chips.csv."""

    chip_id: str
    fault_rate: float
    planned_epochs: float      # NaN when the plan rejected the chip
    status: str = ""           # shipped (verified on validation) | rejected
    reason: str = ""           # why a chip was rejected
    actual_epochs: float = 0.0  # FAT done: planned + extensions (the cap when it never passed)
    n_checks: int = 0          # validation checks (1 = passed at the planned amount)
    val_accuracy: float = math.nan
    test_accuracy: float = math.nan      # reported only: nothing is decided on it
    test_ci_low: float = math.nan
    test_ci_high: float = math.nan
    meets_on_test: bool = False          # test accuracy >= the constraint level on test
    pruned_fraction: float = math.nan
    model_version: str = ""
    champion_version: str = ""
    run_id: str = ""
    trained: bool = False      # False: rejected by the plan, or registered for it already
    serialization_format: str = ""
    train_seconds: float = 0.0
    log_model_seconds: float = 0.0


CHIP_COLUMNS = tuple(ChipOutcome.__dataclass_fields__)


def _pip_requirements() -> list[str]:
    """What a pt2 model needs to load; explicit, so MLflow skips its slow inference."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def _num(tags: dict[str, str], key: str) -> float:
    return float(tags.get(key, "nan"))


def _skip(job: ChipJob, name: str, uri: str, plan_id: str) -> ChipOutcome | None:
    """The outcome of a chip already registered for this plan, or None when it still needs FAT."""
    done = tracking.find_model_versions(uri, name, {names.VTAG_PLAN_RUN: plan_id})
    if not done:
        return None
    mv = next((v for v in done if CHAMPION in v.aliases), None) or done[0]
    tags = mv.tags
    return ChipOutcome(job.chip_id, job.fault_rate, job.planned_epochs,
                       SHIPPED if tags.get(names.VTAG_VERIFIED) == "true" else REJECTED,
                       tags.get(names.VTAG_REASON, ""), _num(tags, names.VTAG_ACTUAL_EPOCHS),
                       int(_num(tags, names.VTAG_N_CHECKS)), _num(tags, names.VTAG_VAL_ACCURACY),
                       _num(tags, names.VTAG_TEST_ACCURACY), _num(tags, "test_ci_low"),
                       _num(tags, "test_ci_high"), tags.get(names.VTAG_CONSTRAINT_MET) == "true",
                       _num(tags, names.VTAG_PRUNED_FRACTION), mv.version,
                       _champion_version(uri, name), mv.run_id, False,
                       tags.get(names.VTAG_SERIALIZATION, ""))


def _withdraw(stage: tracking.StageRun, name: str, reason: str) -> None:
    """A rejected chip loses its champion (one of an older plan, baseline or constraint) and
    its registered model says why; nothing to do when it was never registered."""
    tracking.withdraw_alias(stage, name, CHAMPION, {names.MTAG_STATUS: REJECTED,
                                                     names.MTAG_REASON: reason})


def _reject(stage: tracking.StageRun, job: ChipJob, ctx: FleetContext) -> ChipOutcome:
    """A chip the plan found infeasible: a finished child run that says why, no training."""
    reason = job.reason or "infeasible"
    params = {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
              "plan_run_id": ctx.plan.run_id, "reason": reason}
    run_id = stage.child_run(f"chip {job.chip_id}", params, {},
                             {names.TAG_CHIP: job.chip_id, names.TAG_REJECTED: "true",
                              names.TAG_PLAN_RUN: ctx.plan.run_id})
    _withdraw(stage, registered_name(ctx.prefix, job.chip_id), f"plan: {reason}")
    return ChipOutcome(job.chip_id, job.fault_rate, job.planned_epochs, REJECTED,
                       f"plan: {reason}", run_id=run_id)


def _train_and_register(stage: tracking.StageRun, job: ChipJob, baseline: nn.Module, data: Any,
                        ctx: FleetContext, progress: Progress | None) -> ChipOutcome:
    """FAT one chip for its planned epochs, verify it on validation data (training on in
    steps up to the cap while it misses), log a child run with its model and register it;
    only a verified model becomes the champion."""
    from reduce_ops.models import save_checkpoint

    session = FatSession.from_baseline(baseline, job.fault_map, ctx.layer_types, data, ctx.fat,
                                       ctx.device)

    def measure(amount: float) -> float:
        session.advance(amount)
        val = session.accuracies(("val",))[VAL_ACCURACY]
        if progress is not None:
            progress.inside(f"{amount:g} epochs, val {val:.4f}")
        return val

    check = verify(measure, job.planned_epochs, ctx.plan.decision_level, ctx.margin, ctx.step,
                   ctx.plan.budget_cap)
    model = session.model.cpu().eval()
    session.device = "cpu"
    val_acc = check.checks[-1][1]
    test_acc = session.accuracies(("test",))[TEST_ACCURACY]      # reported, never decided on
    ci = wilson_interval(test_acc, len(data.y["test"]))
    meets = test_acc >= ctx.plan.constraint_level
    status = SHIPPED if check.passed else REJECTED
    reason = "" if check.passed else (
        f"validation accuracy {val_acc:.4f} < {ctx.plan.decision_level + ctx.margin:.4f} "
        f"(level + margin) after {check.epochs:g} epochs, the budget cap")
    name = registered_name(ctx.prefix, job.chip_id)
    params = {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
              "n_faulty": job.fault_map.n_faulty, "pruned_fraction": session.pruned_fraction,
              "planned_epochs": job.planned_epochs, "plan_run_id": ctx.plan.run_id,
              "decision_level": ctx.plan.decision_level, "verify_margin": ctx.margin,
              "constraint_level": ctx.plan.constraint_level, "budget_cap": ctx.plan.budget_cap}
    tags = {names.TAG_CHIP: job.chip_id, names.TAG_PLAN_RUN: ctx.plan.run_id}
    with tracking.model_child_run(stage, f"chip {job.chip_id}", params, tags) as child:
        for amount, accuracy in check.checks:       # the verification, step = milli-epochs
            child.log_metrics({VAL_ACCURACY: accuracy}, step=int(round(amount * 1000)))
        child.log_metrics({TEST_ACCURACY: test_acc, "test_ci_low": ci[0], "test_ci_high": ci[1],
                           "actual_epochs": check.epochs, "n_checks": len(check.checks),
                           "plan_error_epochs": check.epochs - job.planned_epochs,
                           "verified": float(check.passed), "constraint_met": float(meets),
                           "train_seconds": session.train_seconds})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHIP_MODEL_FILE
            info = {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
                    "planned_epochs": job.planned_epochs, "actual_epochs": check.epochs,
                    "verified": check.passed, "test_accuracy": test_acc,
                    "plan_run_id": ctx.plan.run_id, "dataset_hash": ctx.plan.dataset_hash,
                    "run_id": child.run_id}
            save_checkpoint(model, ctx.arch, info, path)
            child.log_artifact(path)
        logged = child.log_pytorch_model(model, ctx.input_example, _pip_requirements())
        child.log_metrics({"log_model_seconds": logged.seconds})
        child.set_tags({names.TAG_SERIALIZATION: logged.serialization_format,
                        **({names.TAG_PT2_FALLBACK: logged.fallback_reason}
                           if logged.fallback_reason else {})})
        version_tags = {names.VTAG_CHIP: job.chip_id, names.VTAG_FAULT_RATE: job.fault_rate,
                        names.VTAG_PLANNED_EPOCHS: job.planned_epochs,
                        names.VTAG_ACTUAL_EPOCHS: check.epochs,
                        names.VTAG_N_CHECKS: len(check.checks),
                        names.VTAG_VERIFIED: str(check.passed).lower(),
                        names.VTAG_REASON: reason,
                        names.VTAG_TEST_ACCURACY: test_acc, "test_ci_low": ci[0],
                        "test_ci_high": ci[1], names.VTAG_VAL_ACCURACY: val_acc,
                        names.VTAG_PRUNED_FRACTION: session.pruned_fraction,
                        names.VTAG_DECISION_LEVEL: ctx.plan.decision_level,
                        names.VTAG_CONSTRAINT_LEVEL: ctx.plan.constraint_level,
                        names.VTAG_PLAN_RUN: ctx.plan.run_id,
                        names.VTAG_CONSTRAINT_MET: str(meets).lower(),
                        names.VTAG_SERIALIZATION: logged.serialization_format}
        model_tags = {names.VTAG_CHIP: job.chip_id, names.VTAG_FAULT_RATE: job.fault_rate,
                      "n_faulty_pes": job.fault_map.n_faulty, names.MTAG_STATUS: status,
                      names.MTAG_REASON: reason}
        version = tracking.register_model_version(
            stage, name, logged, child.run_id, version_tags, CHAMPION if check.passed else None,
            model_tags=model_tags,
            description=f"Model for chip {job.chip_id} (fault rate {job.fault_rate:.4f}): "
                        f"the baseline fault-aware retrained for its fault map.")
    if not check.passed:
        _withdraw(stage, name, reason)
    if logged.fallback_reason:
        ctx.warn(f"chip {job.chip_id}: pt2 export failed ({logged.fallback_reason}); "
                 f"model logged in the pickle format")
    return ChipOutcome(job.chip_id, job.fault_rate, job.planned_epochs, status, reason,
                       check.epochs, len(check.checks), val_acc, test_acc, ci[0], ci[1], meets,
                       session.pruned_fraction, version, version if check.passed else "",
                       child.run_id, True, logged.serialization_format, session.train_seconds,
                       logged.seconds)


def _champion_version(uri: str, name: str) -> str:
    current = tracking.model_version_by_alias(uri, name, CHAMPION)
    return current.version if current else ""


# --------------------------------------------------------------------------- the fleet

@dataclass
class FleetContext:
    """Everything every chip shares: plan, training config, verification, registry prefix."""

    plan: PlanInfo
    fat: FatConfig
    layer_types: Sequence[str]
    device: torch.device | str
    prefix: str
    uri: str
    arch: dict[str, Any]                  # build_model arguments, saved in chip_model.pt
    input_example: np.ndarray             # [2, C, H, W] float32 test images (pt2 tracing)
    margin: float                         # verify.margin
    step: float                           # verify.step, epochs
    force: bool = False
    warn: Callable[[str], None] = print


def run_fleet(stage: tracking.StageRun, jobs: Sequence[ChipJob], baseline: nn.Module, data: Any,
              ctx: FleetContext, progress: Progress | None = None) -> list[ChipOutcome]:
    """Every chip in turn: reject if the plan found it infeasible, skip if registered for this
    plan already (unless force), else FAT + verification + child run + registered version."""
    outcomes = []
    for job in jobs:
        if progress is not None:
            progress.start(f"chip {job.chip_id}")
        name = registered_name(ctx.prefix, job.chip_id)
        outcome = None
        if not job.feasible:
            outcome = _reject(stage, job, ctx)
        elif not ctx.force:
            outcome = _skip(job, name, ctx.uri, ctx.plan.run_id)
        if outcome is None:
            outcome = _train_and_register(stage, job, baseline, data, ctx, progress)
        outcomes.append(outcome)
        if progress is not None:
            progress.done(f"chip {job.chip_id}", _describe(outcome))
    return outcomes


def _describe(o: ChipOutcome) -> str:
    """One progress line for a finished chip."""
    if o.status == REJECTED and math.isnan(o.planned_epochs):
        return f"rejected ({o.reason})"
    how = "" if o.trained else " (registered for this plan before)"
    return (f"{o.status} after {o.actual_epochs:g} epochs (planned {o.planned_epochs:g}), "
            f"val {o.val_accuracy:.4f}, test {o.test_accuracy:.4f}{how}")


def chips_table(outcomes: Sequence[ChipOutcome]) -> pd.DataFrame:
    """chips.csv: one row per chip in plan order."""
    return pd.DataFrame([asdict(o) for o in outcomes], columns=list(CHIP_COLUMNS))


def fleet_summary(outcomes: Sequence[ChipOutcome], plan: PlanInfo) -> dict[str, Any]:
    """Chips shipped and rejected, how many shipped chips meet the constraint on test, epochs
    planned and trained, and the plan's error (actual - planned) over the chips it planned."""
    planned = [o for o in outcomes if not math.isnan(o.planned_epochs)]
    shipped = [o for o in outcomes if o.status == SHIPPED]
    trained = [o for o in outcomes if o.trained]
    errors = np.array([o.actual_epochs - o.planned_epochs for o in planned])
    log_s = sum(o.log_model_seconds for o in trained)
    return {
        "plan_run_id": plan.run_id, "decision_level": plan.decision_level,
        "constraint_level": plan.constraint_level, "budget_cap": plan.budget_cap,
        "n_chips": len(outcomes), "n_planned": len(planned), "n_shipped": len(shipped),
        "n_rejected_by_plan": len(outcomes) - len(planned),
        "n_rejected_at_cap": len(planned) - len(shipped),
        "n_meet_on_test": sum(o.meets_on_test for o in shipped),
        "shipped_meet_rate": (sum(o.meets_on_test for o in shipped) / len(shipped)
                              if shipped else math.nan),
        "total_planned_epochs": float(sum(o.planned_epochs for o in planned)),
        "total_epochs": float(sum(o.actual_epochs for o in planned)),
        "plan_error_mean": float(errors.mean()) if errors.size else 0.0,
        "plan_error_mean_abs": float(np.abs(errors).mean()) if errors.size else 0.0,
        "n_extended": sum(o.n_checks > 1 for o in planned),
        "n_trained": len(trained), "n_skipped": len(planned) - len(trained),
        "trained_epochs": float(sum(o.actual_epochs for o in trained)),
        "train_seconds": sum(o.train_seconds for o in trained),
        "log_model_seconds": log_s,
        "log_model_seconds_per_chip": log_s / len(trained) if trained else 0.0,
        "shipped_missing_on_test": [o.chip_id for o in shipped if not o.meets_on_test],
        "rejected": [o.chip_id for o in outcomes if o.status == REJECTED],
    }


# --------------------------------------------------------------------------- fetch

def _model_name(uri: str, chip_id: str, prefix: str | None) -> str | None:
    """The registered model of a chip: <prefix>-<chip_id>, or (no prefix given) the one model
    tagged with the chip id; None when there is none."""
    if prefix is not None:
        return registered_name(prefix, chip_id)
    found = [n for n, c in tracking.registered_model_tags(uri, names.VTAG_CHIP).items()
             if c == chip_id]
    if len(found) > 1:
        raise TrackingError(f"chip {chip_id!r}: several registered models in {uri} "
                            f"({', '.join(sorted(found))}); give the registry prefix")
    return found[0] if found else None


def champion(uri: str, chip_id: str, prefix: str | None = None) -> tracking.ModelVersionInfo:
    """The chip's champion version, or one TrackingError line saying why there is none (no
    version met the constraint, the plan rejected the chip, or an unknown id: close matches)."""
    name = _model_name(uri, chip_id, prefix)
    if name is not None:
        found = tracking.model_version_by_alias(uri, name, CHAMPION)
        if found is not None:
            return found
        tags = tracking.registered_model_tags_of(uri, name)
        if tags.get(names.MTAG_STATUS) == REJECTED:
            raise TrackingError(f"chip {chip_id!r} has no champion: the current plan rejected "
                                f"it ({tags.get(names.MTAG_REASON) or 'no reason recorded'})")
        versions = tracking.find_model_versions(uri, name)
        if versions:
            raise TrackingError(f"chip {chip_id!r}: {len(versions)} version(s) of {name!r}, "
                                f"none verified (no {CHAMPION!r} alias) in {uri}")
    rejected = tracking.find_runs(uri, {names.TAG_CHIP: chip_id, names.TAG_REJECTED: "true"})
    if rejected:
        reason = rejected[0].params.get("reason", "infeasible")
        raise TrackingError(f"chip {chip_id!r} has no model: the plan found it infeasible "
                            f"({reason})")
    chips = tracking.registered_model_tags(uri, names.VTAG_CHIP)
    known = sorted(c for n, c in chips.items() if prefix is None or n.startswith(f"{prefix}-"))
    close = difflib.get_close_matches(chip_id, known, n=3, cutoff=0.6)
    if close:
        hint = f"; close matches: {', '.join(close)}"
    elif known:
        hint = f"; {len(known)} chips registered, e.g. {', '.join(known[:3])}"
    else:
        hint = "; no chip is registered yet: run `reduce-ops fat`"
    what = f"no registered model {name!r}" if name else "no registered model for it"
    raise TrackingError(f"unknown chip id {chip_id!r}: {what} in {uri}{hint}")


def load_chip_model(chip_id: str, tracking_uri: str | None = None,
                    prefix: str | None = None) -> nn.Module:
    """The chip's champion as a trainable nn.Module in eval mode (built from chip_model.pt).

    Works from any folder: the tracking URI is `tracking_uri` or MLFLOW_TRACKING_URI, and the
    chip's registered model is found by its chip_id tag (give `prefix` when several registry
    prefixes share one server). `mlflow.pytorch.load_model("models:/<prefix>-<chip_id>@champion")`
    gives the same model as a pt2 GraphModule (inference only).
    """
    from reduce_ops.models import load_checkpoint

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError("load_chip_model: give tracking_uri= or set MLFLOW_TRACKING_URI "
                            "(e.g. sqlite:////path/to/project/mlflow.db or http://host:5000)")
    version = champion(uri, chip_id, prefix)
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

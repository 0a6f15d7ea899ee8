"""Step 3 of Reduce: per-chip fault-aware training, one registered model per chip, fetch by id."""

from __future__ import annotations

import json
import math
import dataclasses
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from reduce_ops import execution, names, tracking
from reduce_ops.binomial import wilson_interval
from reduce_ops.config import ExecutionConfig, FatConfig
from reduce_ops.errors import DataError
from reduce_ops.fault_aware import FatSession
from reduce_ops.hardware import FaultMap
from reduce_ops.names import (CHAMPION, CHIP_MODEL_FILE, REJECTED, SHIPPED, TEST_ACCURACY,
                              VAL_ACCURACY, registered_name)
from reduce_ops.planning import PLAN_COLUMNS, Verification, verify
from reduce_ops.progress import Progress

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
    stuck: Any = None          # the chip's stuck register bits (hardware.fault_model stuck_at)


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


def chip_jobs(plan: pd.DataFrame, fleet: Sequence[FaultMap], plan_path: Path,
              stuck: dict[str, Any] | None = None) -> list[ChipJob]:
    """Join plan rows with the fleet's maps (and stuck bits); a plan that does not match the
    fleet is stale."""
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
                            fault_map, (stuck or {}).get(row.chip_id)))
    return jobs


# --------------------------------------------------------------------------- one chip

@dataclass(frozen=True)
class Unit:
    """What one FAT run trains: a chip on its own, or a group of chips sharing its fused map."""

    run_name: str                  # "chip <id>" or "group <id>"
    fault_map: FaultMap            # the chip's map, or the group's fused map
    planned_epochs: float
    members: tuple[ChipJob, ...]
    group_id: str = ""             # "" for a chip on its own

    @classmethod
    def chip(cls, job: ChipJob) -> Unit:
        return cls(f"chip {job.chip_id}", job.fault_map, job.planned_epochs, (job,))

    @property
    def stuck(self) -> Any:
        """A chip's stuck register bits (stuck-at hardware; eFAT groups are bypass only)."""
        return self.members[0].stuck if not self.group_id else None


@dataclass
class ChipOutcome:
    """One row of chips.csv."""

    chip_id: str
    fault_rate: float
    planned_epochs: float      # of the FAT run that served the chip; NaN: rejected by the plan
    status: str = ""           # shipped (verified on validation) | rejected
    reason: str = ""           # why a chip was rejected
    actual_epochs: float = 0.0  # of that run: planned + extensions (the cap when it never passed)
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
    group_id: str = ""         # eFAT group whose fused map the model was trained for
    group_size: int = 1        # chips sharing that run (its epochs count once for all)
    failed_group_epochs: float = 0.0   # share of an eFAT group run that missed at the cap
    serialization_format: str = ""
    train_seconds: float = 0.0
    log_model_seconds: float = 0.0


CHIP_COLUMNS = tuple(ChipOutcome.__dataclass_fields__)


def _pip_requirements() -> list[str]:
    """What a pt2 model needs to load; explicit, so MLflow skips its slow inference."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def _num(tags: dict[str, str], key: str) -> float:
    return float(tags.get(key, "nan"))


def _skipped(job: ChipJob, versions: Sequence[tracking.ModelVersionInfo]) -> ChipOutcome:
    """The outcome of a chip registered for this plan already (`versions`: newest first)."""
    mv = next((v for v in versions if CHAMPION in v.aliases), None) or versions[0]
    tags = mv.tags
    return ChipOutcome(job.chip_id, job.fault_rate, _num(tags, names.VTAG_PLANNED_EPOCHS),
                       SHIPPED if tags.get(names.VTAG_VERIFIED) == "true" else REJECTED,
                       tags.get(names.VTAG_REASON, ""), _num(tags, names.VTAG_ACTUAL_EPOCHS),
                       int(_num(tags, names.VTAG_N_CHECKS)), _num(tags, names.VTAG_VAL_ACCURACY),
                       _num(tags, names.VTAG_TEST_ACCURACY), _num(tags, "test_ci_low"),
                       _num(tags, "test_ci_high"), tags.get(names.VTAG_CONSTRAINT_MET) == "true",
                       _num(tags, names.VTAG_PRUNED_FRACTION), mv.version,
                       mv.version if CHAMPION in mv.aliases else "", mv.run_id, False,
                       tags.get(names.VTAG_GROUP, ""), int(_num(tags, names.VTAG_GROUP_SIZE)),
                       float(tags.get(names.VTAG_FAILED_GROUP_EPOCHS, 0.0)),
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


@dataclass(frozen=True)
class Trained:
    """A unit's FAT run after verification, measured on validation (decided) and test
    (reported)."""

    check: Verification
    val_accuracy: float
    test_accuracy: float
    test_ci: tuple[float, float]
    meets: bool
    pruned_fraction: float
    train_seconds: float
    model: nn.Module


def _train(unit: Unit, baseline: nn.Module, data: Any, ctx: FleetContext,
           progress: Progress | None) -> Trained:
    """FAT for the planned epochs, then the validation check, training on in steps up to the
    cap while it misses."""
    session = FatSession.from_baseline(baseline, unit.fault_map, ctx.layer_types, data, ctx.fat,
                                       ctx.device, unit.stuck)

    def measure(amount: float) -> float:
        session.advance(amount)
        val = session.accuracies(("val",))[VAL_ACCURACY]
        if progress is not None:
            progress.inside(f"{amount:g} epochs, val {val:.4f}")
        return val

    check = verify(measure, unit.planned_epochs, ctx.plan.decision_level, ctx.margin, ctx.step,
                   ctx.plan.budget_cap)
    session.model.cpu().eval()
    session.device = "cpu"
    test = session.accuracies(("test",))[TEST_ACCURACY]      # reported, never decided on
    affected = session.pruned_fraction
    return Trained(check, check.checks[-1][1], test, wilson_interval(test, len(data.y["test"])),
                   test >= ctx.plan.constraint_level, affected, session.train_seconds,
                   session.release())          # the float weights (a stuck-at chip quantizes)


def _reason(t: Trained, ctx: FleetContext) -> str:
    return "" if t.check.passed else (
        f"validation accuracy {t.val_accuracy:.4f} < {ctx.plan.decision_level + ctx.margin:.4f} "
        f"(level + margin) after {t.check.epochs:g} epochs, the budget cap")


def _run_params(unit: Unit, t: Trained, ctx: FleetContext) -> dict[str, Any]:
    common = {"planned_epochs": unit.planned_epochs, "plan_run_id": ctx.plan.run_id,
              "decision_level": ctx.plan.decision_level, "verify_margin": ctx.margin,
              "constraint_level": ctx.plan.constraint_level, "budget_cap": ctx.plan.budget_cap,
              "n_faulty": unit.fault_map.n_faulty, "pruned_fraction": t.pruned_fraction}
    if unit.group_id:
        return {"group_id": unit.group_id, "members": ",".join(j.chip_id for j in unit.members),
                "n_members": len(unit.members), "fused_fault_rate": unit.fault_map.fault_rate,
                **common}
    (job,) = unit.members
    return {"chip_id": job.chip_id, "fault_rate": job.fault_rate, **common}


@contextmanager
def _unit_run(stage: tracking.StageRun, unit: Unit, t: Trained, ctx: FleetContext
              ) -> Iterator[tuple[tracking.ModelChildRun, tracking.LoggedModel]]:
    """The unit's child run, open while its model is registered (an interrupted registration
    leaves the run KILLED, not FINISHED): every check, test accuracy, chip_model.pt and the pt2
    model."""
    from reduce_ops.models import save_checkpoint

    tags = {names.TAG_PLAN_RUN: ctx.plan.run_id,
            **({names.TAG_GROUP: unit.group_id} if unit.group_id
               else {names.TAG_CHIP: unit.members[0].chip_id})}
    with tracking.model_child_run(stage, unit.run_name, _run_params(unit, t, ctx), tags) as child:
        for amount, accuracy in t.check.checks:     # the verification, step = milli-epochs
            child.log_metrics({VAL_ACCURACY: accuracy}, step=int(round(amount * 1000)))
        child.log_metrics({TEST_ACCURACY: t.test_accuracy, "test_ci_low": t.test_ci[0],
                           "test_ci_high": t.test_ci[1], "actual_epochs": t.check.epochs,
                           "n_checks": len(t.check.checks),
                           "plan_error_epochs": t.check.epochs - unit.planned_epochs,
                           "verified": float(t.check.passed), "constraint_met": float(t.meets),
                           "train_seconds": t.train_seconds})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHIP_MODEL_FILE
            info = {"chips": [j.chip_id for j in unit.members], "group_id": unit.group_id,
                    "fault_rate": unit.fault_map.fault_rate,
                    "planned_epochs": unit.planned_epochs, "actual_epochs": t.check.epochs,
                    "verified": t.check.passed, "test_accuracy": t.test_accuracy,
                    "plan_run_id": ctx.plan.run_id, "dataset_hash": ctx.plan.dataset_hash,
                    "run_id": child.run_id}
            save_checkpoint(t.model, ctx.arch, info, path)
            child.log_artifact(path)
        logged = child.log_pytorch_model(t.model, ctx.input_example, _pip_requirements())
        child.log_metrics({"log_model_seconds": logged.seconds})
        child.set_tags({names.TAG_SERIALIZATION: logged.serialization_format,
                        **({names.TAG_PT2_FALLBACK: logged.fallback_reason}
                           if logged.fallback_reason else {})})
        if logged.fallback_reason:
            ctx.warn(f"{unit.run_name}: pt2 export failed ({logged.fallback_reason}); "
                     f"model logged in the pickle format")
        yield child, logged


def _register(stage: tracking.StageRun, unit: Unit, job: ChipJob, t: Trained, run_id: str,
              logged: tracking.LoggedModel, ctx: FleetContext,
              failed_group: tuple[str, float] = ("", 0.0)) -> ChipOutcome:
    """The unit's model as a new version of the chip's own registered model; champion only if
    verified, and a chip that missed loses an older champion. `failed_group`: the eFAT group
    that missed at the cap before the chip trained alone, and the chip's share of its epochs
    (a tag, so a resumed `fat` still counts them)."""
    reason = _reason(t, ctx)
    status = SHIPPED if t.check.passed else REJECTED
    name = registered_name(ctx.prefix, job.chip_id)
    version_tags = {names.VTAG_CHIP: job.chip_id, names.VTAG_FAULT_RATE: job.fault_rate,
                    names.VTAG_PLANNED_EPOCHS: unit.planned_epochs,
                    names.VTAG_ACTUAL_EPOCHS: t.check.epochs,
                    names.VTAG_N_CHECKS: len(t.check.checks),
                    names.VTAG_VERIFIED: str(t.check.passed).lower(), names.VTAG_REASON: reason,
                    names.VTAG_TEST_ACCURACY: t.test_accuracy, "test_ci_low": t.test_ci[0],
                    "test_ci_high": t.test_ci[1], names.VTAG_VAL_ACCURACY: t.val_accuracy,
                    names.VTAG_PRUNED_FRACTION: t.pruned_fraction,
                    names.VTAG_DECISION_LEVEL: ctx.plan.decision_level,
                    names.VTAG_CONSTRAINT_LEVEL: ctx.plan.constraint_level,
                    names.VTAG_PLAN_RUN: ctx.plan.run_id,
                    names.VTAG_CONSTRAINT_MET: str(t.meets).lower(),
                    names.VTAG_SERIALIZATION: logged.serialization_format,
                    names.VTAG_GROUP_SIZE: len(unit.members),
                    **({names.VTAG_GROUP: unit.group_id,
                        names.VTAG_FUSED_RATE: unit.fault_map.fault_rate}
                       if unit.group_id else {}),
                    **({names.VTAG_FAILED_GROUP: failed_group[0],
                        names.VTAG_FAILED_GROUP_EPOCHS: failed_group[1]}
                       if failed_group[0] else {})}
    model_tags = {names.VTAG_CHIP: job.chip_id, names.VTAG_FAULT_RATE: job.fault_rate,
                  "n_faulty_pes": job.fault_map.n_faulty, names.MTAG_STATUS: status,
                  names.MTAG_REASON: reason}
    how = (f"the model of eFAT group {unit.group_id} (fused fault rate "
           f"{unit.fault_map.fault_rate:.4f})" if unit.group_id
           else "the baseline fault-aware retrained for its fault map")
    version = tracking.register_model_version(
        stage, name, logged, run_id, version_tags, CHAMPION if t.check.passed else None,
        model_tags=model_tags,
        description=f"Model for chip {job.chip_id} (fault rate {job.fault_rate:.4f}): {how}.")
    if not t.check.passed:
        _withdraw(stage, name, reason)
    return ChipOutcome(job.chip_id, job.fault_rate, unit.planned_epochs, status, reason,
                       t.check.epochs, len(t.check.checks), t.val_accuracy, t.test_accuracy,
                       t.test_ci[0], t.test_ci[1], t.meets, t.pruned_fraction, version,
                       version if t.check.passed else "", run_id, True, unit.group_id,
                       len(unit.members), failed_group[1], logged.serialization_format,
                       t.train_seconds / len(unit.members), logged.seconds / len(unit.members))


def _log_chip(stage: tracking.StageRun, unit: Unit, trained: Trained, ctx: FleetContext,
              failed_group: tuple[str, float] = ("", 0.0)) -> list[ChipOutcome]:
    """Log a chip's FAT run and register its model."""
    with _unit_run(stage, unit, trained, ctx) as (child, logged):
        return [_register(stage, unit, unit.members[0], trained, child.run_id, logged, ctx,
                          failed_group)]


def _log_group(stage: tracking.StageRun, unit: Unit, todo: Sequence[ChipJob], trained: Trained,
               ctx: FleetContext) -> list[ChipOutcome]:
    """One FAT run on the group's fused map serves every member in `todo`: the group's run
    holds the model, each member gets a version of its own registered model from it and a
    chip run linking to the group's. A group that missed verification at the cap gets its run
    (its members then train on their own) and registers nothing."""
    outcomes = []
    with _unit_run(stage, unit, trained, ctx) as (child, logged):
        if not trained.check.passed:
            return []
        for job in todo:
            outcomes.append(_register(stage, unit, job, trained, child.run_id, logged, ctx))
            stage.child_run(f"chip {job.chip_id}",
                            {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
                             "own_planned_epochs": job.planned_epochs,
                             "group_id": unit.group_id, "group_run_id": child.run_id,
                             "plan_run_id": ctx.plan.run_id},
                            {VAL_ACCURACY: [(0, trained.val_accuracy)],
                             TEST_ACCURACY: [(0, trained.test_accuracy)],
                             "actual_epochs": [(0, trained.check.epochs)]},
                            {names.TAG_CHIP: job.chip_id, names.TAG_PLAN_RUN: ctx.plan.run_id,
                             names.TAG_GROUP: unit.group_id, names.TAG_GROUP_RUN: child.run_id})
    return outcomes


def _finish_registration(stage: tracking.StageRun, o: ChipOutcome, ctx: FleetContext) -> None:
    """A chip registered for this plan by a run that died before it moved the champion alias
    (SIGKILL between the two calls): a verified version becomes champion, a rejected one
    withdraws an older champion. Nothing to do for a chip whose registration finished."""
    name = registered_name(ctx.prefix, o.chip_id)
    if o.status == SHIPPED and not o.champion_version:
        tracking.set_alias(stage, name, CHAMPION, o.model_version)
        o.champion_version = o.model_version
    elif o.status == REJECTED:          # champion may still be on an older plan's version
        _withdraw(stage, name, o.reason)


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


@dataclass(frozen=True)
class _Work:
    """One FAT run for the workers: a unit and its members not registered for the plan yet."""

    unit: Unit
    todo: tuple[ChipJob, ...]


def _train_task(shared: tuple[nn.Module, Any, FleetContext, Progress | None],
                work: _Work) -> Trained:
    """What a worker does for one unit: train and verify (no MLflow)."""
    baseline, data, ctx, progress = shared
    if progress is not None:
        progress.start(work.unit.run_name)
    return _train(work.unit, baseline, data, ctx, progress)


def run_fleet(stage: tracking.StageRun, units: Sequence[Unit], rejected: Sequence[ChipJob],
              baseline: nn.Module, data: Any, ctx: FleetContext,
              progress: Progress | None = None, exe: ExecutionConfig | None = None,
              queue: tracking.BackgroundTracking | None = None) -> list[ChipOutcome]:
    """Chips the plan rejected get a run that says why; every unit (a chip, or an eFAT group)
    is skipped for chips registered for this plan already (unless force), else trained and
    verified (on `exe`'s workers), then logged and registered by `queue`'s process while the
    next units train; a group that misses at the cap falls back to its members alone.
    Outcomes come in plan order (rejected chips first) whatever order the units finish in."""
    exe = exe or ExecutionConfig()
    own_queue = queue is None
    queue = queue or tracking.BackgroundTracking(stage)
    futures: dict[str, Any] = {}                 # chip id -> future of its outcome list
    wctx = dataclasses.replace(ctx, warn=_warn_stderr)   # what other processes get
    try:
        for job in rejected:
            futures[job.chip_id] = queue.submit(_reject_list, job, wctx, holds_model=False)
            if progress is not None:
                progress.done(f"chip {job.chip_id}", f"rejected ({job.reason or 'infeasible'})")
        with stage.timed():
            done = ({} if ctx.force else tracking.model_versions_with_tag(
                ctx.uri, names.VTAG_PLAN_RUN, ctx.plan.run_id))
        work = []
        for unit in units:
            todo = []
            for job in unit.members:
                before = done.get(registered_name(ctx.prefix, job.chip_id))
                if before:
                    o = _skipped(job, before)
                    futures[job.chip_id] = queue.submit(_finish_list, o, wctx, holds_model=False)
                    if progress is not None:
                        progress.done(f"chip {job.chip_id}", _describe(o))
                else:
                    todo.append(job)
            if todo:
                work.append(_Work(unit, tuple(todo)))
        fallback: list[_Work] = []
        failed_share: dict[str, tuple[str, float]] = {}  # member -> failed group, its share

        def trained(batch: list[_Work], i: int, t: Trained) -> None:
            unit, todo = batch[i].unit, batch[i].todo
            if unit.group_id and not t.check.passed:
                queue.submit(_log_group, unit, todo, t, wctx)
                if progress is not None:
                    progress.note(f"{unit.run_name}: missed verification at the cap; its "
                                  f"{len(todo)} chips train on their own")
                fallback.extend(_Work(Unit.chip(j), (j,)) for j in todo)
                failed_share.update({j.chip_id: (unit.group_id, ctx.plan.budget_cap / len(todo))
                                     for j in todo})
                return
            if unit.group_id:
                future = queue.submit(_log_group, unit, todo, t, wctx)
            else:
                future = queue.submit(_log_chip, unit, t, wctx,
                                      failed_share.get(todo[0].chip_id, ("", 0.0)))
            for job in todo:
                futures[job.chip_id] = future
                if progress is not None:
                    progress.done(f"chip {job.chip_id}", _describe_trained(t, unit))

        local = exe.backend == "local"
        # workers get what they need to train; the driver's progress callback stays here
        shared = (baseline, data, ctx if local else wctx, progress if local else None)
        execution.map_unordered(_train_task, shared, work, exe,
                                lambda i, t: trained(work, i, t))
        if fallback:
            execution.map_unordered(_train_task, shared, fallback, exe,
                                    lambda i, t: trained(fallback, i, t))
        queue.drain()
    finally:
        if own_queue:
            queue.close()
    outcomes: list[ChipOutcome] = []
    for job_id in [j.chip_id for j in rejected] + [j.chip_id for u in units for j in u.members]:
        found = futures[job_id].result()
        outcomes.append(next(o for o in found if o.chip_id == job_id))
    return outcomes


def _warn_stderr(line: str) -> None:
    """A warning from a worker or the logger process (they have no progress bar)."""
    import sys

    print(f"fat: {line}", file=sys.stderr, flush=True)


def _reject_list(stage: tracking.StageRun, job: ChipJob, ctx: FleetContext) -> list[ChipOutcome]:
    return [_reject(stage, job, ctx)]


def _finish_list(stage: tracking.StageRun, o: ChipOutcome, ctx: FleetContext
                 ) -> list[ChipOutcome]:
    _finish_registration(stage, o, ctx)
    return [o]


def _describe_trained(t: Trained, unit: Unit) -> str:
    """One progress line for a chip whose FAT run has just finished."""
    return (f"{SHIPPED if t.check.passed else REJECTED} after {t.check.epochs:g} epochs "
            f"(planned {unit.planned_epochs:g}), val {t.val_accuracy:.4f}, "
            f"test {t.test_accuracy:.4f}")


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
    planned and trained (a group's run counted once), and the plan's error (actual - planned
    epochs) over the runs it planned."""
    planned = [o for o in outcomes if not math.isnan(o.planned_epochs)]
    shipped = [o for o in outcomes if o.status == SHIPPED]
    trained = [o for o in outcomes if o.trained]
    share = np.array([1.0 / o.group_size for o in planned])          # of each chip's run
    errors = np.array([o.actual_epochs - o.planned_epochs for o in planned])
    log_s = sum(o.log_model_seconds for o in trained)

    def epochs(chips: Sequence[ChipOutcome], key: str) -> float:
        return float(sum(getattr(o, key) / o.group_size for o in chips))

    failed = float(sum(o.failed_group_epochs for o in planned))
    return {
        "plan_run_id": plan.run_id, "decision_level": plan.decision_level,
        "constraint_level": plan.constraint_level, "budget_cap": plan.budget_cap,
        "n_chips": len(outcomes), "n_planned": len(planned), "n_shipped": len(shipped),
        "n_rejected_by_plan": len(outcomes) - len(planned),
        "n_rejected_at_cap": len(planned) - len(shipped),
        "n_meet_on_test": sum(o.meets_on_test for o in shipped),
        "shipped_meet_rate": (sum(o.meets_on_test for o in shipped) / len(shipped)
                              if shipped else math.nan),
        "n_fat_runs": int(round(share.sum())), "n_grouped_chips": sum(o.group_size > 1
                                                                       for o in planned),
        "total_planned_epochs": epochs(planned, "planned_epochs"),
        "total_epochs": epochs(planned, "actual_epochs") + failed,
        "failed_group_epochs": failed,
        "plan_error_mean": float((errors * share).sum() / share.sum()) if errors.size else 0.0,
        "plan_error_mean_abs": (float((np.abs(errors) * share).sum() / share.sum())
                                if errors.size else 0.0),
        "n_extended": int(round(sum(s for o, s in zip(planned, share) if o.n_checks > 1))),
        "n_trained": len(trained), "n_skipped": len(planned) - len(trained),
        "trained_epochs": epochs(trained, "actual_epochs"),
        "train_seconds": sum(o.train_seconds for o in trained),
        "log_model_seconds": log_s,
        "log_model_seconds_per_chip": log_s / len(trained) if trained else 0.0,
        "shipped_missing_on_test": [o.chip_id for o in shipped if not o.meets_on_test],
        "rejected": [o.chip_id for o in outcomes if o.status == REJECTED],
    }

"""The logging process's side of `fat`: each FAT run's child run (every check, the test
accuracy, chip_model.pt, the pt2 model) and one registered model version per chip it serves,
`champion` only when verified, under the key of everything that decided it (model_key); a chip
the plan rejects gets a run that says why, one the fleet lost is retired; a second `fat` of the
plan registering the same chip at once is settled in the registry (_settle)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reduce_ops import names
from reduce_ops.names import (
    CHAMPION,
    CHIP_MODEL_FILE,
    REJECTED,
    RETIRED,
    SHIPPED,
    TEST_ACCURACY,
    VAL_ACCURACY,
    registered_name,
)
from reduce_ops.models import Preprocess
from reduce_ops.records.chips import ChipOutcome, from_version, version_tags
from reduce_ops.retraining import runview
from reduce_ops.retraining.units import ChipJob, Unit
from reduce_ops.retraining.worker import Trained, TrainSettings, miss_reason
from reduce_ops.shipping import ShippingRule
from reduce_ops.tracking.registry import (
    ModelVersionInfo,
    delete_model_version,
    find_model_versions,
    model_versions_with_tag,
    registered_model_tags,
    register_model_version,
    set_alias,
    withdraw_alias,
)
from reduce_ops.tracking import layout
from reduce_ops.tracking.modelrun import (
    LoggedModel,
    ModelChildRun,
    link_logged_model,
    model_child_run,
)
from reduce_ops.tracking.runs import StageRun


@dataclass(frozen=True)
class RegistryContext:
    """What every chip's registration shares: the plan it was trained for and how its model is
    saved."""

    plan_run_id: str
    rule: ShippingRule
    dataset_hash: str
    prefix: str                           # registry.prefix
    arch: dict[str, Any]                  # build_model arguments, saved in chip_model.pt
    input_example: np.ndarray             # [2, C, H, W] uint8 raw test images (pt2 tracing)
    preprocess: Preprocess                # what the served model does to them inside
    warn: Callable[[str], None] = print
    settings_key: str = ""                # settings_key(): what decides every chip's model
    # {registered model name: its versions for the plan when this run started}: any other
    # version under a chip's key was registered meanwhile, by another `fat` of the plan
    known: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)


def settings_key(settings: TrainSettings, plan_run_id: str, baseline_hash: str,
                 dataset_hash: str) -> str:
    """A digest of everything besides the chip itself that decides a chip's model: the plan,
    baseline and data, fat.* (optimizer, lr, seed...), the layers on the array and the rule it
    is verified by. The device is left out (the same model, up to float rounding)."""
    payload = {"plan": plan_run_id, "baseline": baseline_hash, "dataset": dataset_hash,
               "fat": dataclasses.asdict(settings.fat),
               "layer_types": list(settings.layer_types),
               "rule": dataclasses.asdict(settings.rule)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def model_key(ctx: RegistryContext, unit: Unit) -> str:
    """The key a chip's version is registered under and skipped by: the settings, and the FAT
    run that serves it (its map, stuck bits, planned epochs, group and members). A chip whose
    group missed and that then trained alone keeps its group's key: the same inputs give the
    same outcome."""
    h = hashlib.sha256(ctx.settings_key.encode())
    faulty = np.ascontiguousarray(unit.fault_map.faulty, dtype=bool)
    h.update(repr((unit.group_id, [j.chip_id for j in unit.members], repr(unit.planned_epochs),
                   faulty.shape)).encode())
    h.update(faulty.tobytes())
    if unit.stuck is not None:
        h.update(unit.stuck.and_mask.numpy().tobytes())
        h.update(unit.stuck.or_mask.numpy().tobytes())
    return h.hexdigest()[:32]


def _pip_requirements() -> list[str]:
    """What a pt2 model needs to load; explicit, so MLflow skips its slow inference."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def registered(uri: str, plan_run_id: str) -> dict[str, list[ModelVersionInfo]]:
    """{registered model name: its versions for this plan, newest first}."""
    return model_versions_with_tag(uri, names.VTAG_PLAN_RUN, plan_run_id)


def same_key(versions: Sequence[ModelVersionInfo], key: str) -> list[ModelVersionInfo]:
    """The versions registered under `key` (newest first): only those may be skipped; one of
    the plan made with other fat.*, layers or groups is retrained."""
    return [v for v in versions if v.tags.get(names.VTAG_MODEL_KEY) == key]


def skipped(versions: Sequence[ModelVersionInfo]) -> ChipOutcome:
    """The outcome of a chip registered for this plan already (`versions`: newest first): its
    champion, else its newest version."""
    mv = next((v for v in versions if CHAMPION in v.aliases), None) or versions[0]
    return from_version(mv.tags, mv.version, mv.aliases, mv.run_id)


def _withdraw(stage: StageRun, name: str, reason: str) -> None:
    """A rejected chip loses its champion (one of an older plan, baseline or constraint) and
    its registered model says why; nothing to do when it was never registered."""
    withdraw_alias(stage, name, CHAMPION, {names.MTAG_STATUS: REJECTED,
                                           names.MTAG_REASON: reason})


def retire(stage: StageRun, ctx: RegistryContext, fleet_ids: Sequence[str]) -> list[str]:
    """Registered chips of this prefix that the plan's fleet no longer has (n_chips lowered,
    another fleet) lose their champion, and their registered model says why: `fetch` must not
    serve a model for a chip the project no longer ships. Returns their chip ids."""
    fleet = set(fleet_ids)
    with stage.timed():
        chips = registered_model_tags(stage.uri, names.VTAG_CHIP)
    gone = sorted((name, chip) for name, chip in chips.items()
                  if name == registered_name(ctx.prefix, chip) and chip not in fleet)
    for name, _ in gone:
        withdraw_alias(stage, name, CHAMPION, {
            names.MTAG_STATUS: RETIRED,
            names.MTAG_REASON: f"not in the fleet of plan {ctx.plan_run_id}"})
    return [chip for _, chip in gone]


def reject(stage: StageRun, job: ChipJob, ctx: RegistryContext) -> list[ChipOutcome]:
    """A chip the plan found infeasible: a finished child run that says why, no training."""
    reason = job.reason or "infeasible"
    params = {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
              "plan_run_id": ctx.plan_run_id, "reason": reason}
    now = time.time()                   # no work: a run that takes no time
    run_id = stage.child_run(runview.rejected_run_name(job), params, {},
                             {names.TAG_CHIP: job.chip_id, names.TAG_REJECTED: "true",
                              names.TAG_PLAN_RUN: ctx.plan_run_id,
                              names.TAG_VERDICT: REJECTED, names.TAG_TRAINED: "false"},
                             span=(now, now),
                             description=runview.rejected_description(job, reason))
    _withdraw(stage, registered_name(ctx.prefix, job.chip_id), f"plan: {reason}")
    return [ChipOutcome(job.chip_id, job.fault_rate, job.planned_epochs, REJECTED,
                        f"plan: {reason}", run_id=run_id)]


def _run_params(unit: Unit, t: Trained, ctx: RegistryContext) -> dict[str, Any]:
    rule = ctx.rule
    common = {"planned_epochs": unit.planned_epochs, "plan_run_id": ctx.plan_run_id,
              "decision_level": rule.decision_level, "verify_margin": rule.margin,
              "constraint_level": rule.constraint_level, "budget_cap": rule.cap,
              "n_faulty": unit.fault_map.n_faulty, "pruned_fraction": t.pruned_fraction}
    if unit.group_id:
        return {"group_id": unit.group_id, "members": ",".join(j.chip_id for j in unit.members),
                "n_members": len(unit.members), "fused_fault_rate": unit.fault_map.fault_rate,
                **common}
    (job,) = unit.members
    return {"chip_id": job.chip_id, "fault_rate": job.fault_rate, **common}


@contextmanager
def _unit_run(stage: StageRun, unit: Unit, t: Trained, ctx: RegistryContext
              ) -> Iterator[tuple[ModelChildRun, LoggedModel | None]]:
    """The unit's child run, open while its model is registered (an interrupted registration
    leaves the run KILLED, not FINISHED): every check, test accuracy, chip_model.pt and the pt2
    model, at the times the worker measured them; the run spans the worker's FAT run. A group
    that missed at the cap logs no model (it ships with no chip): None."""
    from reduce_ops.models import save_checkpoint

    tags = {names.TAG_PLAN_RUN: ctx.plan_run_id, **runview.unit_tags(unit, t),
            **({names.TAG_GROUP: unit.group_id} if unit.group_id
               else {names.TAG_CHIP: unit.members[0].chip_id})}
    with model_child_run(stage, runview.unit_run_name(unit, t), _run_params(unit, t, ctx), tags,
                         start=t.started or None) as child:
        child.end = t.ended or None
        times = t.check_times or (None,) * len(t.check.checks)
        for (amount, measured), when in zip(t.check.checks, times):   # step = milli-epochs
            child.log_metrics({VAL_ACCURACY: measured.accuracy,
                               "val_lower": ctx.rule.lower(measured)},
                              step=int(round(amount * 1000)), when=when)
        child.log_metrics({TEST_ACCURACY: t.test_accuracy, "test_ci_low": t.test_ci[0],
                           "test_ci_high": t.test_ci[1], "actual_epochs": t.check.epochs,
                           "n_checks": len(t.check.checks),
                           "plan_error_epochs": t.check.epochs - unit.planned_epochs,
                           "verified": float(t.check.passed), "constraint_met": float(t.meets),
                           "train_seconds": t.train_seconds}, when=child.end)
        if unit.group_id and not t.check.passed:
            yield child, None
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHIP_MODEL_FILE
            info = {"chips": [j.chip_id for j in unit.members], "group_id": unit.group_id,
                    "fault_rate": unit.fault_map.fault_rate,
                    "planned_epochs": unit.planned_epochs, "actual_epochs": t.check.epochs,
                    "verified": t.check.passed, "test_accuracy": t.test_accuracy,
                    "plan_run_id": ctx.plan_run_id, "dataset_hash": ctx.dataset_hash,
                    "run_id": child.run_id}
            save_checkpoint(t.model, ctx.arch, info, path)
            child.log_artifact(path)
        logged = child.log_pytorch_model(ctx.preprocess.wrap(t.model), ctx.input_example,
                                         _pip_requirements(), name=runview.model_name(unit))
        child.log_metrics({"log_model_seconds": logged.seconds})
        child.set_tags({names.TAG_SERIALIZATION: logged.serialization_format,
                        **({names.TAG_PT2_FALLBACK: logged.fallback_reason}
                           if logged.fallback_reason else {})})
        if logged.fallback_reason:
            ctx.warn(f"{unit.run_name}: pt2 export failed ({logged.fallback_reason}); "
                     f"model logged in the pickle format")
        yield child, logged


def _register(stage: StageRun, unit: Unit, job: ChipJob, t: Trained, run_id: str,
              logged: LoggedModel, ctx: RegistryContext, key: str,
              failed_group: tuple[str, float] = ("", 0.0)) -> ChipOutcome:
    """The unit's model as a new version of the chip's own registered model; champion only if
    verified, and a chip that missed loses an older champion. `failed_group`: the eFAT group
    that missed at the cap before the chip trained alone, and the chip's share of its epochs
    (a tag, so a resumed `fat` still counts them)."""
    reason = miss_reason(t, ctx.rule)
    status = SHIPPED if t.check.passed else REJECTED
    name = registered_name(ctx.prefix, job.chip_id)
    n = len(unit.members)
    outcome = ChipOutcome(
        job.chip_id, job.fault_rate, unit.planned_epochs, status, reason,
        actual_epochs=t.check.epochs, n_checks=len(t.check.checks),
        val_accuracy=t.val_accuracy, test_accuracy=t.test_accuracy, test_ci_low=t.test_ci[0],
        test_ci_high=t.test_ci[1], meets_on_test=t.meets, pruned_fraction=t.pruned_fraction,
        run_id=run_id, trained=True, group_id=unit.group_id,
        group_size=n, failed_group_epochs=failed_group[1],
        serialization_format=logged.serialization_format, train_seconds=t.train_seconds / n,
        log_model_seconds=logged.seconds / n)
    context = {names.VTAG_DECISION_LEVEL: ctx.rule.decision_level,
               names.VTAG_CONSTRAINT_LEVEL: ctx.rule.constraint_level,
               names.VTAG_PLAN_RUN: ctx.plan_run_id, names.VTAG_MODEL_KEY: key,
               **({names.VTAG_FUSED_RATE: f"{unit.fault_map.fault_rate:.4f}"}
                  if unit.group_id else {}),
               **({names.VTAG_FAILED_GROUP: failed_group[0]} if failed_group[0] else {})}
    model_tags = {names.VTAG_CHIP: job.chip_id, names.VTAG_FAULT_RATE: f"{job.fault_rate:.4f}",
                  "n_faulty_pes": job.fault_map.n_faulty, names.MTAG_STATUS: status,
                  names.MTAG_REASON: reason}
    how = (f"the model of eFAT group {unit.group_id} (fused fault rate "
           f"{unit.fault_map.fault_rate:.4f})" if unit.group_id
           else "the baseline fault-aware retrained for its fault map")
    outcome.model_version = register_model_version(
        stage, name, logged, run_id, version_tags(outcome, context),
        CHAMPION if t.check.passed else None, model_tags=model_tags,
        description=f"Model for chip {job.chip_id} (fault rate {job.fault_rate:.4f}): {how}. "
                    f"{ctx.preprocess.describe()}",
        version_description=runview.version_description(
            unit, t, layout.run_link(stage.children_experiment, run_id),
            layout.logged_model_link(stage.children_experiment, logged.model_id)
            if logged.model_id else ""))
    outcome.champion_version = outcome.model_version if t.check.passed else ""
    if not t.check.passed:
        _withdraw(stage, name, reason)
    return _settle(stage, name, key, ctx, outcome)


def _settle(stage: StageRun, name: str, key: str, ctx: RegistryContext,
            mine: ChipOutcome) -> ChipOutcome:
    """Two `fat` runs of one plan at once each register a chip they both found unregistered:
    the registry then holds two versions under one key. The lowest version wins; the run
    that registered a later one deletes it, points `champion` at the winner (when verified)
    and reports the winner's outcome. Versions there before this run started (an earlier
    `--force`) are not in the contest."""
    with stage.timed():
        same = [v for v in find_model_versions(stage.uri, name, {names.VTAG_PLAN_RUN:
                                                                 ctx.plan_run_id,
                                                                 names.VTAG_MODEL_KEY: key})
                if v.version not in ctx.known.get(name, frozenset())]
    if len(same) <= 1:
        return mine
    winner = min(same, key=lambda v: int(v.version))
    if winner.version == mine.model_version:
        return mine
    delete_model_version(stage, name, mine.model_version)
    verified = winner.tags.get(names.VTAG_VERIFIED) == "true"
    if verified:
        set_alias(stage, name, CHAMPION, winner.version)
    ctx.warn(f"chip {mine.chip_id}: another `fat` of this plan registered it first (version "
             f"{winner.version}); this run's version {mine.model_version} is withdrawn")
    return from_version(winner.tags, winner.version, (CHAMPION,) if verified else (),
                        winner.run_id)


def log_chip(stage: StageRun, unit: Unit, trained: Trained, ctx: RegistryContext, key: str,
             failed_group: tuple[str, float] = ("", 0.0)) -> list[ChipOutcome]:
    """Log a chip's FAT run and register its model under `key` (model_key)."""
    with _unit_run(stage, unit, trained, ctx) as (child, logged):
        outcome = _register(stage, unit, unit.members[0], trained, child.run_id, logged, ctx,
                            key, failed_group)
        child.describe(runview.chip_description(
            unit, trained, outcome.reason, _version_link(ctx, outcome), outcome.model_version,
            _name(ctx, outcome), failed_group[0]))
        return [outcome]


def _name(ctx: RegistryContext, o: ChipOutcome) -> str:
    return registered_name(ctx.prefix, o.chip_id)


def _version_link(ctx: RegistryContext, o: ChipOutcome) -> str:
    return layout.model_version_link(_name(ctx, o), o.model_version)


def log_group(stage: StageRun, unit: Unit, todo: Sequence[ChipJob], trained: Trained,
              ctx: RegistryContext, key: str) -> list[ChipOutcome]:
    """One FAT run on the group's fused map serves every member in `todo`: the group's run
    holds the model, each member gets a version of its own registered model from it and a
    chip run linking to the group's (and showing its model). A group that missed verification
    at the cap gets its run (its members then train on their own) and registers nothing."""
    outcomes = []
    with _unit_run(stage, unit, trained, ctx) as (child, logged):
        if not trained.check.passed:
            child.describe(runview.group_description(unit, trained,
                                                     miss_reason(trained, ctx.rule)))
            return []
        group_link = layout.run_link(stage.children_experiment, child.run_id)
        members = []
        for job in todo:
            o = _register(stage, unit, job, trained, child.run_id, logged, ctx, key)
            outcomes.append(o)
            member = stage.child_run(
                runview.member_run_name(job, unit),
                {"chip_id": job.chip_id, "fault_rate": job.fault_rate,
                 "own_planned_epochs": job.planned_epochs, "group_id": unit.group_id,
                 "group_run_id": child.run_id, "plan_run_id": ctx.plan_run_id},
                {VAL_ACCURACY: [(0, trained.val_accuracy)],
                 TEST_ACCURACY: [(0, trained.test_accuracy)],
                 "actual_epochs": [(0, trained.check.epochs)]},
                {names.TAG_CHIP: job.chip_id, names.TAG_PLAN_RUN: ctx.plan_run_id,
                 names.TAG_GROUP: unit.group_id, names.TAG_GROUP_RUN: child.run_id,
                 names.TAG_VERDICT: SHIPPED, names.TAG_TRAINED: "false"},
                span=(trained.started, trained.ended) if trained.started else None,
                description=runview.member_description(job, unit, group_link,
                                                       _version_link(ctx, o), o.model_version,
                                                       _name(ctx, o)))
            if logged.model_id:
                link_logged_model(stage, member, logged.model_id)
            members.append((job.chip_id, layout.run_link(stage.children_experiment, member),
                            _version_link(ctx, o)))
        child.describe(runview.group_description(unit, trained, "", members))
    return outcomes


def finish(stage: StageRun, o: ChipOutcome, ctx: RegistryContext) -> list[ChipOutcome]:
    """A chip registered for this plan by a run that died before it moved the champion alias
    (SIGKILL between the two calls): a verified version becomes champion, a rejected one
    withdraws an older champion. Nothing to do for a chip whose registration finished."""
    name = registered_name(ctx.prefix, o.chip_id)
    if o.status == SHIPPED and not o.champion_version:
        set_alias(stage, name, CHAMPION, o.model_version)
        o.champion_version = o.model_version
    elif o.status == REJECTED:          # champion may still be on an older plan's version
        _withdraw(stage, name, o.reason)
    return [o]


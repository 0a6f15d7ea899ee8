"""`fat`'s runs on the workers: chips registered for the plan (under the same model key) already
are skipped, the rest
train (execution's backend) while the logging process logs and registers the models of the runs
that finished; an eFAT group that misses at the cap falls back to its members alone."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from reduce_ops import execution, grouping
from reduce_ops.batched import batch_size, chunks
from reduce_ops.config import ExecutionConfig
from reduce_ops.names import REJECTED, registered_name
from reduce_ops.progress import Progress
from reduce_ops.records.chips import ChipOutcome
from reduce_ops.retraining import registration, worker
from reduce_ops.retraining.registration import RegistryContext
from reduce_ops.retraining.units import ChipJob, Unit
from reduce_ops.retraining.worker import Trained, TrainSettings, describe
from reduce_ops.tracking.logger import BackgroundTracking
from reduce_ops.tracking.runs import StageRun


@dataclass(frozen=True)
class _Work:
    """One FAT run for the workers: a unit and its members not registered for the plan yet."""

    unit: Unit
    todo: tuple[ChipJob, ...]
    key: str                   # registration.model_key of the unit the plan and groups made


@dataclass(frozen=True)
class _Shared:
    """What every worker gets once: the baseline, the data, how to train; the progress bar
    only when the units run in the driver (one local worker)."""

    baseline: nn.Module
    data: Any
    settings: TrainSettings
    progress: Progress | None


def _train_task(shared: _Shared, work: _Work) -> Trained:
    """What a worker does for one unit: train and verify (no MLflow)."""
    if shared.progress is not None:
        shared.progress.start(work.unit.run_name)
    return worker.train(work.unit, shared.baseline, shared.data, shared.settings,
                        shared.progress)


def _train_batch_task(shared: _Shared, works: tuple[_Work, ...]) -> list[Trained]:
    """Several units trained as one computation (reduce_ops.batched), each verified."""
    if shared.progress is not None:
        shared.progress.start(f"{works[0].unit.run_name} and {len(works) - 1} more at once")
    return worker.train_batch([w.unit for w in works], shared.baseline, shared.data,
                              shared.settings, shared.progress)


def _batched(items: list[_Work], size: int, workers: int = 1) -> list[list[int]]:
    """Chunks of units that train as one: similar planned epochs together (so that few finish
    long before the others), in the order of the plan within a chunk."""
    order = sorted(range(len(items)), key=lambda i: (items[i].unit.planned_epochs, i))
    return [sorted(order[i] for i in chunk)
            for chunk in chunks([0] * len(order), size, workers)]


def _warn_stderr(line: str) -> None:
    """A warning from the logging process (it has no progress bar)."""
    print(f"fat: {line}", file=sys.stderr, flush=True)


def _describe(o: ChipOutcome) -> str:
    """One progress line for a chip that did not train in this run."""
    if o.status == REJECTED and math.isnan(o.planned_epochs):
        return f"rejected ({o.reason})"
    how = "" if o.trained else " (registered for this plan before)"
    return (f"{o.status} after {o.actual_epochs:g} epochs (planned {o.planned_epochs:g}), "
            f"val {o.val_accuracy:.4f}, test {o.test_accuracy:.4f}{how}")


class _Fleet:
    """One `fat` run's bookkeeping: the future of every chip's outcome, and the chips of failed
    groups that train on their own afterwards."""

    def __init__(self, queue: BackgroundTracking, ctx: RegistryContext, cap: float,
                 progress: Progress | None) -> None:
        self.queue, self.ctx, self.cap, self.progress = queue, ctx, cap, progress
        self.futures: dict[str, Any] = {}           # chip id -> future of its outcome list
        self.fallback: list[_Work] = []
        self.failed_share: dict[str, tuple[str, float]] = {}   # chip -> failed group, share

    def done(self, chip_id: str, line: str, seconds: float | None = None) -> None:
        if self.progress is not None:
            self.progress.done(f"chip {chip_id}", line, seconds)

    def reject(self, job: ChipJob) -> None:
        self.futures[job.chip_id] = self.queue.submit(registration.reject, job, self.ctx,
                                                      holds_model=False)
        self.done(job.chip_id, f"rejected ({job.reason or 'infeasible'})")

    def skip(self, job: ChipJob, outcome: ChipOutcome) -> None:
        outcome.fault_rate = job.fault_rate         # exact (version tags show 4 digits)
        self.futures[job.chip_id] = self.queue.submit(registration.finish, outcome, self.ctx,
                                                      holds_model=False)
        self.done(job.chip_id, _describe(outcome))

    def trained(self, work: _Work, t: Trained) -> None:
        """Hand a finished run to the logging process; a group that missed at the cap logs its
        run and queues its chips to train alone, each carrying its share of the group's run."""
        unit, todo = work.unit, work.todo
        if unit.group_id and not t.check.passed:
            self.queue.submit(registration.log_group, unit, todo, t, self.ctx, work.key)
            if self.progress is not None:
                self.progress.note(f"{unit.run_name}: missed verification at the cap; its "
                                   f"{len(todo)} chips train on their own")
            self.fallback.extend(_Work(Unit.chip(j), (j,), work.key) for j in todo)
            share = grouping.member_share(self.cap, len(todo))
            self.failed_share.update({j.chip_id: (unit.group_id, share) for j in todo})
            return
        if unit.group_id:
            future = self.queue.submit(registration.log_group, unit, todo, t, self.ctx, work.key)
        else:
            future = self.queue.submit(registration.log_chip, unit, t, self.ctx, work.key,
                                       self.failed_share.get(todo[0].chip_id, ("", 0.0)))
        for job in todo:
            self.futures[job.chip_id] = future
            self.done(job.chip_id, describe(t, unit),
                      t.ended - t.started if t.started else None)

    def outcome(self, chip_id: str) -> ChipOutcome:
        return next(o for o in self.futures[chip_id].result() if o.chip_id == chip_id)


def run(stage: StageRun, units: Sequence[Unit], rejected: Sequence[ChipJob],
        baseline: nn.Module, data: Any, settings: TrainSettings, ctx: RegistryContext,
        uri: str, force: bool = False, progress: Progress | None = None,
        exe: ExecutionConfig | None = None,
        queue: BackgroundTracking | None = None) -> list[ChipOutcome]:
    """Registered chips the plan's fleet lacks are retired; chips the plan rejected get a run
    that says why; every unit (a chip, or an eFAT group) is skipped for chips registered for
    this plan under the unit's model key already (unless `force`), else trained and
    verified (on `exe`'s workers), then logged and registered by `queue`'s process while the
    next units train. Outcomes come in plan order (rejected chips first) whatever order the
    units finish in."""
    exe = exe or execution.LOCAL
    own_queue = queue is None
    queue = queue or BackgroundTracking(stage)
    ctx = dataclasses.replace(ctx, warn=_warn_stderr)    # it runs in the logging process
    fleet = _Fleet(queue, ctx, settings.rule.cap, progress)
    try:
        retired = registration.retire(stage, ctx, [j.chip_id for j in rejected]
                                      + [j.chip_id for u in units for j in u.members])
        if retired and progress is not None:
            progress.note(f"{len(retired)} registered chips are not in this plan's fleet and "
                          f"lose their champion: {', '.join(retired[:5])}"
                          + (" ..." if len(retired) > 5 else ""))
        for job in rejected:
            fleet.reject(job)
        with stage.timed():
            registered = registration.registered(uri, ctx.plan_run_id)
        ctx = dataclasses.replace(ctx, known={name: frozenset(v.version for v in versions)
                                              for name, versions in registered.items()})
        fleet.ctx = ctx
        done = {} if force else registered
        work = []
        other_settings = 0
        for unit in units:
            todo = []
            key = registration.model_key(ctx, unit)
            for job in unit.members:
                versions = done.get(registered_name(ctx.prefix, job.chip_id), [])
                before = registration.same_key(versions, key)
                if before:
                    fleet.skip(job, registration.skipped(before))
                else:
                    other_settings += bool(versions)
                    todo.append(job)
            if todo:
                work.append(_Work(unit, tuple(todo), key))
        if other_settings and progress is not None:
            progress.note(f"{other_settings} chips registered for this plan with other settings "
                          f"(fat.*, hardware.layer_types, groups) train again")
        local = not execution.pooled(exe)
        shared = _Shared(baseline, data, settings, progress if local else None)
        stuck = any(w.unit.stuck is not None for w in work)
        size = batch_size(exe.batch, baseline, stuck, data.x["train"][:4], settings.device)
        for batch in (work, fleet.fallback):        # the fallback fills while `work` runs
            items = list(batch)
            if items and size > 1:
                groups = _batched(items, size, execution.parallel(exe))
                execution.map_unordered(
                    _train_batch_task, shared, [tuple(items[i] for i in g) for g in groups], exe,
                    lambda j, ts, groups=groups, items=items: [
                        fleet.trained(items[i], t) for i, t in zip(groups[j], ts)])
            elif items:
                execution.map_unordered(_train_task, shared, items, exe,
                                        lambda i, t, items=items: fleet.trained(items[i], t))
        queue.drain()
    finally:
        if own_queue:
            queue.close()
    order = [j.chip_id for j in rejected] + [j.chip_id for u in units for j in u.members]
    return [fleet.outcome(c) for c in order]

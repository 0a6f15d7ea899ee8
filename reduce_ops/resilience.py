"""Step 1 of Reduce: resilience trials (fault rate x repetition, FAP then one FAT run each)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from reduce_ops import execution
from reduce_ops.batched import BatchedFat, batch_size, chunks
from reduce_ops.config import (
    ExecutionConfig,
    FatConfig,
    HardwareConfig,
    ResilienceConfig,
)
from reduce_ops.fault_aware import FatCheckpoint, FatCurve, fat_curve
from reduce_ops.hardware import GENERATORS, ArrayGeometry, FaultMap
from reduce_ops.names import VAL_ACCURACY
from reduce_ops.needs import settled
from reduce_ops.progress import Progress
from reduce_ops.records.trials import TrialResult, TrialSpec
from reduce_ops.shipping import Measurement, ShippingRule


@dataclass(frozen=True)
class TrialTarget:
    """How far a trial trains: the grid (resilience.max_epochs), then on in checkpoint steps,
    up to the budget cap, until the monotone fit of what the shipping rule reads (validation
    accuracy, less its guard band) has reached `level` `confirm` epochs before its last
    measurement."""

    level: float          # what a chip must show on validation to ship (rule.ship_level)
    cap: float            # plan.budget_cap, epochs
    confirm: float        # resilience.confirm_epochs
    rule: ShippingRule | None = None     # its guard band; None: the accuracy itself

    def decided(self, measured: list[Measurement]) -> list[float]:
        """What the rule reads at each checkpoint of a trial (pooled like a chip's checks)."""
        if self.rule is None:
            return [m.accuracy for m in measured]
        return list(self.rule.pooled_curve([self.rule.lower(m) for m in measured]))


def checkpoint_amounts(cfg: ResilienceConfig) -> list[float]:
    """0, every, 2*every, ..., max_epochs (max always included), in epochs."""
    n = int(np.floor(cfg.max_epochs / cfg.checkpoint_every + 1e-9))
    amounts = [round(i * cfg.checkpoint_every, 6) for i in range(n + 1)]
    if amounts[-1] < cfg.max_epochs - 1e-9:
        amounts.append(float(cfg.max_epochs))
    return amounts


def trial_seed(base_seed: int, fault_rate: float, repetition: int) -> int:
    """Fault-map seed keyed by (rate, repetition): adding rates never changes other trials."""
    ss = np.random.SeedSequence([base_seed, int(round(fault_rate * 1_000_000)), repetition])
    return int(ss.generate_state(1)[0])


def trial_grid(cfg: ResilienceConfig) -> list[TrialSpec]:
    """Every (fault rate, repetition) of the grid, rates ascending."""
    return [TrialSpec(float(r), rep, trial_seed(cfg.seed, float(r), rep))
            for r in sorted(cfg.fault_rates) for rep in range(cfg.repetitions)]


def grid_hash(res: ResilienceConfig, fat: FatConfig, hardware: HardwareConfig,
              target: TrialTarget, baseline_hash: str, dataset_hash: str) -> str:
    """Identity of a trial set: same hash = same trials (used to resume an interrupted run)."""
    spec = {"amounts": checkpoint_amounts(res), "generator": res.generator, "seed": res.seed,
            "fat": dataclasses.asdict(fat), "hardware": dataclasses.asdict(hardware),
            "target": dataclasses.asdict(target),
            "baseline": baseline_hash, "dataset": dataset_hash}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def trial_stuck_bits(fmap: FaultMap, spec: TrialSpec, hardware: HardwareConfig) -> Any:
    """For stuck-at hardware, the trial's faulty PEs' stuck register bits (seeded by the
    trial's fault seed); None when faulty PEs are bypassed."""
    if hardware.fault_model != "stuck_at":
        return None
    from reduce_ops.hardware.bitfaults import pe_stuck_map
    from reduce_ops.hardware.stuckfleet import POLARITY

    s = hardware.stuck_at
    return pe_stuck_map(fmap.faulty, torch.Generator().manual_seed(spec.fault_seed), s.bits,
                        s.n_bits, POLARITY[s.polarity], fmap.chip_id, key="hardware.stuck_at")


def _trial_map(spec: TrialSpec, res: ResilienceConfig, hardware: HardwareConfig) -> FaultMap:
    geometry = ArrayGeometry(hardware.rows, hardware.cols)
    return GENERATORS[res.generator](geometry, spec.fault_rate, spec.fault_seed,
                                     f"trial-{spec.key}")


def _trial_fat(fat: FatConfig, spec: TrialSpec) -> FatConfig:
    """Batch order differs per repetition too, so repetitions sample both sources of variance."""
    return dataclasses.replace(fat, seed=fat.seed + spec.repetition)


def run_trial(baseline: nn.Module, data: Any, spec: TrialSpec, res: ResilienceConfig,
              fat: FatConfig, hardware: HardwareConfig, target: TrialTarget,
              device: torch.device | str = "cpu",
              on_checkpoint: Callable[[FatCheckpoint], None] | None = None) -> TrialResult:
    """Draw the trial's fault map, prune (FAP), then FAT once with accuracy at every checkpoint
    of the grid; a trial that has not settled at the level by then goes on (see TrialTarget)."""
    fmap = _trial_map(spec, res, hardware)
    stuck = trial_stuck_bits(fmap, spec, hardware)
    started, times = time.time(), []

    def stamp(cp: FatCheckpoint) -> None:      # right after each checkpoint's measurement
        times.append(time.time())
        if on_checkpoint is not None:
            on_checkpoint(cp)

    # Every decision reads validation, at every checkpoint; the test split only reports, so
    # it is measured once, on the trial's final model (half the evaluation of both at each).
    curve = fat_curve(baseline, fmap, hardware.layer_types, data, checkpoint_amounts(res),
                      _trial_fat(fat, spec), device, splits=("val",), on_checkpoint=stamp,
                      stuck=stuck)
    return _finish_trial(curve, fmap, spec, res, target, started, times, stamp)


def _finish_trial(curve: FatCurve, fmap: FaultMap, spec: TrialSpec, res: ResilienceConfig,
                  target: TrialTarget, started: float, times: list[float],
                  stamp: Callable[[FatCheckpoint], None]) -> TrialResult:
    """A trial measured over the grid: on past it while it has not settled, then its test
    split once."""
    while (curve.amounts[-1] < target.cap - 1e-9
           and not settled(curve.amounts, target.decided(curve.measured["val"]),
                           target.level, target.confirm)):
        curve.extend([min(round(curve.amounts[-1] + res.checkpoint_every, 9), target.cap)],
                     stamp)
    t0 = time.perf_counter()
    final_test = curve.session.measure(("test",))["test"].accuracy
    curve.seconds += time.perf_counter() - t0
    if times:               # the last checkpoint's measurement now includes the test split
        times[-1] = time.time()
    val = curve.measured["val"]
    test = [math.nan] * (len(val) - 1) + [final_test]
    return TrialResult(spec, fmap.n_faulty, curve.session.pruned_fraction, curve.amounts,
                       [m.accuracy for m in val], test, curve.seconds,
                       res.max_epochs, val_lost=[m.lost for m in val],
                       val_gained=[m.gained for m in val], started=started, times=times)


def run_trial_batch(baseline: nn.Module, data: Any, specs: Sequence[TrialSpec],
                    res: ResilienceConfig, fat: FatConfig, hardware: HardwareConfig,
                    target: TrialTarget, device: torch.device | str = "cpu",
                    on_checkpoint: Callable[[FatCheckpoint], None] | None = None,
                    ) -> list[TrialResult]:
    """`run_trial` for trials of one repetition (one FAT seed), their grid trained as one
    computation (reduce_ops.batched; the same within float rounding); each goes on past the
    grid alone where it has not settled. Each trial's seconds are its share of the grid."""
    fmaps = [_trial_map(spec, res, hardware) for spec in specs]
    started, t0 = time.time(), time.perf_counter()
    run = BatchedFat.from_baseline(baseline, fmaps, hardware.layer_types, data,
                                   _trial_fat(fat, specs[0]), device)
    amounts = checkpoint_amounts(res)
    measured: list[list[Measurement]] = [[] for _ in specs]
    times: list[float] = []
    for amount in amounts:
        run.advance(amount)
        for kept, m in zip(measured, run.measure(("val",))):
            kept.append(m["val"])
        times.append(time.time())
        if on_checkpoint is not None:       # where the batch is: its lowest and highest val
            vals = [kept[-1].accuracy for kept in measured]
            on_checkpoint(FatCheckpoint(amount, run.steps, {
                VAL_ACCURACY: min(vals), "val_max": max(vals), "units": len(specs)},
                run.train_seconds))
    share = (time.perf_counter() - t0) / len(specs)
    out = []
    for k, (spec, fmap) in enumerate(zip(specs, fmaps)):
        session = run.session(k)
        curve = FatCurve(session, ("val",), list(amounts), {"val": measured[k]},
                         [session.train_seconds] * len(amounts), share)
        mine = list(times)
        def stamp(cp: FatCheckpoint, mine: list[float] = mine) -> None:
            mine.append(time.time())
            if on_checkpoint is not None:
                on_checkpoint(cp)

        out.append(_finish_trial(curve, fmap, spec, res, target, started, mine, stamp))
    return out


@dataclass(frozen=True)
class TrialInputs:
    """What every trial of a grid shares (sent to Ray's object store once)."""

    baseline: nn.Module
    data: Any
    res: ResilienceConfig
    fat: FatConfig
    hardware: HardwareConfig
    target: TrialTarget
    device: torch.device | str
    on_checkpoint: Callable[[FatCheckpoint], None] | None = None   # one local worker only


def _trial_task(inputs: TrialInputs, spec: TrialSpec) -> TrialResult:
    return run_trial(inputs.baseline, inputs.data, spec, inputs.res, inputs.fat, inputs.hardware,
                     inputs.target, inputs.device, inputs.on_checkpoint)


def _batch_task(inputs: TrialInputs, specs: tuple[TrialSpec, ...]) -> list[TrialResult]:
    return run_trial_batch(inputs.baseline, inputs.data, specs, inputs.res, inputs.fat,
                           inputs.hardware, inputs.target, inputs.device, inputs.on_checkpoint)


def run_trials(baseline: nn.Module, data: Any, specs: list[TrialSpec], res: ResilienceConfig,
               fat: FatConfig, hardware: HardwareConfig, target: TrialTarget,
               device: torch.device | str, reusable: dict[str, TrialResult],
               on_trial: Any = None, progress: Progress | None = None,
               exe: ExecutionConfig | None = None) -> list[TrialResult]:
    """All trials of the grid, reusing finished ones (by key) from an interrupted run; the rest
    run on `exe`'s backend (default: here, one after another).

    `on_trial(result)` is called on this process as each trial finishes (to log it); `progress`
    hears of every trial, and with one local worker of every checkpoint inside one.
    Returns the results in the order of `specs`.
    """
    exe = exe or execution.LOCAL
    results: dict[str, TrialResult] = {}

    def finished(result: TrialResult) -> None:
        results[result.spec.key] = result
        if on_trial is not None:
            on_trial(result)
        if progress is not None:
            how = (" (reused)" if result.reused_from else
                   f" (past the grid, to {result.amounts[-1]:g} epochs)" if result.extended else "")
            progress.done(f"trial {result.spec.key}{how}",
                          f"val {result.val_accuracy[0]:.4f} -> {result.val_accuracy[-1]:.4f} "
                          f"after {result.amounts[-1]:g} epochs", result.seconds)

    todo = []
    for spec in specs:
        prior = reusable.get(spec.key)
        if prior is not None and prior.spec == spec:
            finished(prior)
        else:
            todo.append(spec)
    def inside(cp: FatCheckpoint) -> None:
        if "units" in cp.metrics:           # trials trained as one computation
            progress.inside(f"{cp.amount:g}/{res.max_epochs:g} epochs, {cp.metrics['units']:g} "
                            f"trials at once, val {cp.metrics[VAL_ACCURACY]:.4f}-"
                            f"{cp.metrics['val_max']:.4f}")
            return
        progress.inside(f"{cp.amount:g}/{res.max_epochs:g} epochs, "
                        f"val {cp.metrics[VAL_ACCURACY]:.4f}")

    on_cp = inside if progress is not None and not execution.pooled(exe) else None

    def next_starts(i: int) -> None:
        if progress is not None and i + 1 < len(todo):
            progress.start(f"trial {todo[i + 1].key}")

    if progress is not None and todo:
        progress.start(f"trial {todo[0].key}")
    inputs = TrialInputs(baseline, data, res, fat, hardware, target, device, on_cp)
    size = batch_size(exe.batch, baseline, hardware.fault_model == "stuck_at",
                      data.x["train"][:4], device)
    if size > 1:                # trials of one repetition share their batches: one computation
        groups = chunks([spec.repetition for spec in todo], size,
                        execution.parallel(exe))
        execution.map_unordered(
            _batch_task, inputs, [tuple(todo[i] for i in g) for g in groups], exe,
            lambda j, results: ([finished(r) for r in results], next_starts(groups[j][-1])))
    else:
        execution.map_unordered(_trial_task, inputs, todo, exe,
                                lambda i, result: (finished(result), next_starts(i)))
    return [results[spec.key] for spec in specs]

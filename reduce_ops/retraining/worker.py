"""What a worker does for one FAT run: train for the planned epochs, check on the decision split,
train on in steps up to the cap while it misses, then measure the report split. No MLflow here:
the result goes back to the driver, which hands it to the logging process."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reduce_ops.binomial import wilson_interval
from reduce_ops.config import FatConfig
from reduce_ops.fault_aware import FatSession
from reduce_ops.hardware import pruned_fraction
from reduce_ops.names import REJECTED, SHIPPED
from reduce_ops.progress import Progress
from reduce_ops.retraining.units import Unit
from reduce_ops.shipping import (
    Measurement,
    ShippingRule,
    Verification,
    resume,
    verification,
    verify,
)
from reduce_ops.training import measure_splits


@dataclass(frozen=True)
class TrainSettings:
    """What every FAT run shares: how to train, on which layers and device, and the rule it
    must pass."""

    fat: FatConfig
    layer_types: Sequence[str]
    device: torch.device | str
    rule: ShippingRule


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
    started: float = 0.0                  # time.time() the run started (FAP)...
    ended: float = 0.0                    # ... and ended (test measured)
    check_times: tuple[float, ...] = ()   # time.time() of each check's measurement


def train(unit: Unit, baseline: nn.Module, data: Any, settings: TrainSettings,
          progress: Progress | None = None) -> Trained:
    """FAT for the planned epochs, then the validation check, training on in steps up to the
    cap while it misses."""
    started = time.time()
    measured_at: dict[float, float] = {}
    session = FatSession.from_baseline(baseline, unit.fault_map, settings.layer_types, data,
                                       settings.fat, settings.device, unit.stuck)
    check = verify(_measurer(session, measured_at, progress), unit.planned_epochs, settings.rule)
    session.model.cpu().eval()
    session.device = "cpu"
    test = session.measure(("test",))["test"].accuracy      # reported, never decided on
    return Trained(check, check.val_accuracy, test, wilson_interval(test, len(data.y["test"])),
                   settings.rule.meets(test), session.pruned_fraction, session.train_seconds,
                   session.release(),          # the float weights (a stuck-at chip quantizes)
                   started, time.time(), tuple(measured_at[a] for a, _ in check.checks))


def _measurer(session: FatSession, measured_at: dict[float, float],
              progress: Progress | None, label: str = "") -> Callable[[float], Measurement]:
    """What a check measures: `session` trained on to the amount, then its validation split
    (the time of each measurement kept in `measured_at`)."""

    def measure(amount: float) -> Measurement:
        session.advance(amount)
        val = session.measure(("val",))["val"]
        measured_at[amount] = time.time()
        if progress is not None:
            progress.inside(f"{label}{amount:g} epochs, val {val.accuracy:.4f}")
        return val

    return measure


def miss_reason(t: Trained, rule: ShippingRule) -> str:
    """Why a run that missed at the cap is rejected ("" when it passed)."""
    if t.check.passed:
        return ""
    last = t.check.checks[-1][1]
    band = rule.band(last)
    shown = (f"validation accuracy {last.accuracy:.4f} - guard band {band:.4f}"
             if band else f"validation accuracy {last.accuracy:.4f}")
    return (f"{shown} < {rule.ship_level:.4f} (level + margin) after {t.check.epochs:g} "
            f"epochs, the budget cap")


def describe(t: Trained, unit: Unit) -> str:
    """One progress line for a run that has just finished."""
    return (f"{SHIPPED if t.check.passed else REJECTED} after {t.check.epochs:g} epochs "
            f"(planned {unit.planned_epochs:g}), val {t.val_accuracy:.4f}, "
            f"test {t.test_accuracy:.4f}")


def train_batch(units: Sequence[Unit], baseline: nn.Module, data: Any,
                settings: TrainSettings, progress: Progress | None = None) -> list[Trained]:
    """`train` for several units (bypass faults, one FAT seed) as one computation
    (reduce_ops.batched): each unit's checks as it would run them alone (the same within float
    rounding). A unit that has passed keeps its model of that step; once half of the units have
    finished, the rest hand on and go on alone, so no finished unit trains long in the stack."""
    from reduce_ops.batched import BatchedFat

    started = time.time()
    run = BatchedFat.from_baseline(baseline, [u.fault_map for u in units], settings.layer_types,
                                   data, settings.fat, settings.device)
    steps = {k: verification(u.planned_epochs, settings.rule) for k, u in enumerate(units)}
    asked = {k: next(gen) for k, gen in steps.items()}
    times: dict[int, dict[float, float]] = {k: {} for k in steps}
    done: dict[int, tuple[Verification, nn.Module, float]] = {}
    while asked and len(asked) * 2 > len(units):
        amount = min(asked.values())
        run.advance(amount)
        measured = run.measure(("val",))
        if progress is not None:
            progress.inside(f"{amount:g} epochs, {len(asked)} of {len(units)} at once still "
                            f"checking")
        for k in [k for k, a in asked.items() if a == amount]:
            times[k][amount] = time.time()
            try:
                asked[k] = steps[k].send(measured[k]["val"])
            except StopIteration as finished:
                done[k] = (finished.value, run.model(k), run.train_seconds / len(units))
                del asked[k]
    for k, amount in asked.items():               # the rest alone, from where they are
        session = run.session(k)
        check = resume(steps[k], amount, _measurer(session, times[k], progress,
                                                   f"{units[k].run_name}: "))
        done[k] = (check, session.model, session.train_seconds)
    out = []
    for k, unit in enumerate(units):
        check, model, seconds = done[k]
        model.cpu().eval()
        test = measure_splits(model, data, ("test",), "cpu", run.paired)["test"].accuracy
        out.append(Trained(check, check.val_accuracy, test,
                           wilson_interval(test, len(data.y["test"])), settings.rule.meets(test),
                           pruned_fraction(run.masks[k]), seconds, model, started, time.time(),
                           tuple(times[k][a] for a, _ in check.checks)))
    return out

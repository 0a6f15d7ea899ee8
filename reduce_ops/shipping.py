"""The shipping rule: what a chip's model must show on the decision (validation) split before it
ships, how a chip that misses trains on, and what judges a shipped chip on the report (test)
split. Computed once from the baseline's accuracies and the config; every stage reads it."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from reduce_ops.config import Config
from reduce_ops.errors import ConfigError, DataError


def constraint_level(kind: str, value: float, baseline_accuracy: float) -> float:
    """The accuracy every chip must reach: `value` itself, or baseline minus the allowed drop."""
    if kind == "absolute":
        return float(value)
    if kind == "drop":
        return float(baseline_accuracy - value)
    raise ConfigError(f"constraint.kind: expected absolute or drop, got {kind!r}")


@dataclass(frozen=True)
class ShippingRule:
    """Decided on validation, judged on test: a chip ships when its validation accuracy is at
    least `ship_level` (the constraint level on validation plus the guard band `margin`); one
    that misses trains on in `step`s up to `cap` epochs, where it is rejected. A shipped chip
    meets the constraint when its test accuracy is at least `constraint_level`."""

    decision_level: float      # the constraint on the validation split (drop: from the baseline)
    constraint_level: float    # the constraint on the test split (reported, never decided on)
    margin: float              # verify.margin: the guard band above decision_level
    step: float                # verify.step, epochs
    cap: float                 # plan.budget_cap, epochs

    @classmethod
    def from_baseline(cls, kind: str, value: float, margin: float, step: float, cap: float,
                      baseline_val: float, baseline_test: float) -> ShippingRule:
        """Each split's level from the baseline's accuracy on that split."""
        return cls(constraint_level(kind, value, baseline_val),
                   constraint_level(kind, value, baseline_test), margin, step, cap)

    @classmethod
    def from_config(cls, cfg: Config, baseline_val: float, baseline_test: float
                    ) -> ShippingRule:
        """The rule params.yaml states (constraint, verify, plan.budget_cap) for a baseline."""
        return cls.from_baseline(cfg.constraint.kind, cfg.constraint.value, cfg.verify.margin,
                                 cfg.verify.step, cfg.plan.budget_cap, baseline_val,
                                 baseline_test)

    @property
    def ship_level(self) -> float:
        """Validation accuracy a chip must reach to ship."""
        return self.decision_level + self.margin

    def passes(self, val_accuracy: float) -> bool:
        return val_accuracy >= self.ship_level

    def meets(self, test_accuracy: float) -> bool:
        """The verdict on the report split (never an input to a decision)."""
        return bool(test_accuracy >= self.constraint_level)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> ShippingRule:
        """Read back what to_dict wrote; one line naming `where` when a field is missing."""
        try:
            return cls(**{k: float(d[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: no complete shipping rule ({type(exc).__name__}: {exc}); "
                            f"run the stage that wrote it again") from None


@dataclass(frozen=True)
class Verification:
    """A chip's check against the rule: where it passed (or the cap), every check."""

    passed: bool
    epochs: float                          # amount at the first pass, or the cap
    checks: tuple[tuple[float, float], ...]  # (amount, validation accuracy) of every check

    @property
    def extended(self) -> bool:
        return len(self.checks) > 1

    @property
    def val_accuracy(self) -> float:
        """At the last check: where it passed, or at the cap."""
        return self.checks[-1][1] if self.checks else math.nan


def check_amounts(planned: float, step: float, cap: float) -> list[float]:
    """planned, planned + step, ... and the cap itself: where a chip is checked."""
    n = max(0, math.ceil((cap - planned) / step - 1e-9))
    amounts = [round(min(planned + k * step, cap), 9) for k in range(n + 1)]
    return sorted(set(amounts))


def verification(planned: float, rule: ShippingRule
                 ) -> Generator[float, float, Verification]:
    """The check of one chip as a generator: it yields the next amount to measure, is sent the
    validation accuracy there, and returns the Verification. The chip passes at the first check
    that `rule` passes; checks run from the planned amount every `rule.step` epochs up to the
    cap."""
    checks = []
    for amount in check_amounts(planned, rule.step, rule.cap):
        accuracy = yield amount
        checks.append((amount, accuracy))
        if rule.passes(accuracy):
            return Verification(True, amount, tuple(checks))
    return Verification(False, checks[-1][0] if checks else planned, tuple(checks))


def verify(measure: Callable[[float], float], planned: float,
           rule: ShippingRule) -> Verification:
    """Run `verification` with `measure(amount)`, which trains on to `amount` (ascending) and
    returns the validation accuracy there."""
    steps = verification(planned, rule)
    try:
        amount = next(steps)
        while True:
            amount = steps.send(measure(amount))
    except StopIteration as done:
        return done.value

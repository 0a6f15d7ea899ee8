"""The shipping rule: what a chip's model must show on the decision (validation) split before it
ships, how a chip that misses trains on, and what judges a shipped chip on the report (test)
split. Computed once from the baseline's accuracies and the config; every stage reads it."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import ndtri  # scipy.stats.norm.ppf, to the bit, without its 0.4 s import

from reduce_ops.config import Config
from reduce_ops.errors import ConfigError, DataError


@dataclass(frozen=True)
class Measurement:
    """A model on one split, image by image against the baseline on the same images: what a
    paired decision reads (accuracy alone for an absolute level)."""

    accuracy: float
    n: int
    lost: int = 0      # images the baseline classifies right and the model wrong
    gained: int = 0    # images the baseline classifies wrong and the model right

    @classmethod
    def of(cls, correct: Any, reference: Any = None) -> Measurement:
        """From per-image correctness [N] (bool tensor or array) and the baseline's on the
        same images."""
        n = int(correct.shape[0])
        if reference is None:
            return cls(int(correct.sum()) / max(n, 1), n)
        lost = int((reference & ~correct).sum())
        gained = int((~reference & correct).sum())
        return cls(int(correct.sum()) / max(n, 1), n, lost, gained)


def constraint_level(kind: str, value: float, baseline_accuracy: float) -> float:
    """The accuracy every chip must reach: `value` itself, or baseline minus the allowed drop."""
    if kind == "absolute":
        return float(value)
    if kind == "drop":
        return float(baseline_accuracy - value)
    raise ConfigError(f"constraint.kind: expected absolute or drop, got {kind!r}")


@dataclass(frozen=True)
class ShippingRule:
    """Decided on validation, judged on test: a chip ships when the lower end of what its
    validation measurement says (its accuracy minus the guard band) is at least `ship_level`
    (the constraint level on validation plus the flat `margin`); one that misses trains on in
    `step`s up to `cap` epochs, where it is rejected. A shipped chip meets the constraint when
    its test accuracy is at least `constraint_level`.

    The guard band follows from `escape_rate`, the chance a user accepts that a chip shipped on
    what validation showed misses the constraint on test: z(1 - escape_rate) standard errors of
    the difference between what the two splits will show, from the measured noise. With a
    `drop` constraint both splits are measured against the baseline on the same images
    (`paired`), so the noise is the chip's own disagreement with the baseline; with an
    `absolute` level it is the chip's binomial noise. No escape rate: the flat margin alone.
    With `pool` > 1 a check reads the mean of what the rule compares (accuracy less band) over
    this check and the `pool - 1` measurements one `step` apart before it (the model of a few
    hundred optimizer steps earlier; a lucky measurement alone does not ship a chip).
    """

    decision_level: float      # the constraint on the validation split (drop: from the baseline)
    constraint_level: float    # the constraint on the test split (reported, never decided on)
    margin: float              # verify.margin: a flat guard band above decision_level
    step: float                # verify.step, epochs
    cap: float                 # plan.budget_cap, epochs
    escape_rate: float = 0.0   # verify.escape_rate (0: no statistical band)
    paired: bool = False       # drop constraint: noise from the disagreement with the baseline
    n_decision: int = 0        # images of the validation split
    n_report: int = 0          # images of the test split (the verdict's own noise)
    pool: int = 1              # verify.pool: a check reads the mean over this many checks

    @classmethod
    def from_baseline(cls, kind: str, value: float, margin: float, step: float, cap: float,
                      baseline_val: float, baseline_test: float, escape_rate: float = 0.0,
                      n_decision: int = 0, n_report: int = 0, pool: int = 1) -> ShippingRule:
        """Each split's level from the baseline's accuracy on that split."""
        return cls(constraint_level(kind, value, baseline_val),
                   constraint_level(kind, value, baseline_test), margin, step, cap,
                   escape_rate, kind == "drop", n_decision, n_report, pool)

    @classmethod
    def from_config(cls, cfg: Config, baseline_val: float, baseline_test: float,
                    n_decision: int, n_report: int) -> ShippingRule:
        """The rule params.yaml states (constraint, verify, plan.budget_cap) for a baseline and
        split sizes; one line naming verify.escape_rate when the decision split is too small
        for it (a model as good as the baseline could never ship)."""
        rule = cls.from_baseline(cfg.constraint.kind, cfg.constraint.value, cfg.verify.margin,
                                 cfg.verify.step, cfg.plan.budget_cap, baseline_val,
                                 baseline_test, cfg.verify.escape_rate or 0.0, n_decision,
                                 n_report, cfg.verify.pool)
        as_good = round(baseline_val * n_decision)         # the baseline's own measurement
        like_baseline = Measurement(baseline_val, n_decision, 0, 0)
        if rule.escape_rate and not rule.passes(like_baseline):
            raise ConfigError(
                f"verify.escape_rate: {rule.escape_rate:g} needs a guard band of "
                f"{rule.band(like_baseline):.4f} on {n_decision} validation images, so even a "
                f"model that scores like the baseline ({as_good}/{n_decision}) could not ship "
                f"(level {rule.ship_level:.4f}); accept a larger escape rate, or give the "
                f"validation split more images (data.val_fraction)")
        return rule

    @property
    def ship_level(self) -> float:
        """Validation accuracy a chip must reach to ship (before the band)."""
        return self.decision_level + self.margin

    @property
    def z(self) -> float:
        """Standard errors in the band: z(1 - escape_rate), 0 without an escape rate."""
        return float(ndtri(1.0 - self.escape_rate)) if self.escape_rate > 0 else 0.0

    def band(self, m: Measurement) -> float:
        """The guard band for one measurement: z standard errors of (validation - test)."""
        return float(self.bands(np.array([m.accuracy]), np.array([m.lost]),
                                np.array([m.gained]), m.n)[0])

    def bands(self, accuracy: np.ndarray, lost: np.ndarray, gained: np.ndarray,
              n: int) -> np.ndarray:
        """`band` for arrays of measurements on `n` images (vectorised, for a trials table)."""
        accuracy = np.asarray(accuracy, dtype=float)
        if self.escape_rate <= 0 or n <= 0:
            return np.zeros_like(accuracy)
        if self.paired:      # per image: chip right minus baseline right, in {-1, 0, 1}
            d = (np.asarray(gained, float) - np.asarray(lost, float)) / n
            var = (np.asarray(lost, float) + np.asarray(gained, float) + 1.0) / n - d * d
        else:                # per image: chip right, in {0, 1}; one pseudo-image each way
            p = (accuracy * n + 1.0) / (n + 2.0)
            var = p * (1.0 - p)
        se = np.sqrt(np.maximum(var, 0.0) * (1.0 / n + 1.0 / max(self.n_report or n, 1)))
        return self.z * se

    def lower(self, m: Measurement) -> float:
        """What the rule compares with ship_level: the accuracy minus the band."""
        return m.accuracy - self.band(m) if self.escape_rate > 0 else m.accuracy

    def passes(self, m: Measurement, before: Sequence[Measurement] = ()) -> bool:
        """Whether a check with measurement `m` ships the chip; `before`: the measurements one
        step apart before it, newest last (the rule pools the last `pool` - 1 of them)."""
        return self.pooled(m, before) >= self.ship_level

    def pooled(self, m: Measurement, before: Sequence[Measurement] = ()) -> float:
        """The mean of `lower` over `m` and up to `pool` - 1 measurements before it."""
        if self.pool <= 1:
            return self.lower(m)
        window = [*list(before)[-(self.pool - 1):], m]
        return sum(self.lower(x) for x in window) / len(window)

    def pooled_curve(self, lowers: Sequence[float]) -> np.ndarray:
        """`pooled` along one run's curve of lowers (one step apart): what each check reads."""
        x = np.asarray(lowers, dtype=float)
        if self.pool <= 1 or x.size == 0:
            return x
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = x[max(0, i - self.pool + 1):i + 1].mean()
        return out

    def meets(self, test_accuracy: float) -> bool:
        """The verdict on the report split (never an input to a decision)."""
        return bool(test_accuracy >= self.constraint_level)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> ShippingRule:
        """Read back what to_dict wrote; one line naming `where` when a field is missing."""
        kinds = {"paired": bool, "n_decision": int, "n_report": int, "pool": int}
        defaults = {"escape_rate": 0.0, "paired": False, "n_decision": 0, "n_report": 0,
                    "pool": 1}
        try:
            return cls(**{k: kinds.get(k, float)(d[k] if k in d else defaults[k])
                          for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: no complete shipping rule ({type(exc).__name__}: {exc}); "
                            f"run the stage that wrote it again") from None


@dataclass(frozen=True)
class Verification:
    """A chip's check against the rule: where it passed (or the cap), every check."""

    passed: bool
    epochs: float                                  # amount at the first pass, or the cap
    checks: tuple[tuple[float, Measurement], ...]  # (amount, validation measurement) per check

    @property
    def extended(self) -> bool:
        return len(self.checks) > 1

    @property
    def val_accuracy(self) -> float:
        """At the last check: where it passed, or at the cap."""
        return self.checks[-1][1].accuracy if self.checks else math.nan


def check_amounts(planned: float, step: float, cap: float) -> list[float]:
    """planned, planned + step, ... and the cap itself: where a chip is checked."""
    n = max(0, math.ceil((cap - planned) / step - 1e-9))
    amounts = [round(min(planned + k * step, cap), 9) for k in range(n + 1)]
    return sorted(set(amounts))


def verification(planned: float, rule: ShippingRule
                 ) -> Generator[float, Measurement, Verification]:
    """The check of one chip as a generator: it yields the next amount to measure, is sent the
    validation measurement there, and returns the Verification. The chip passes at the first
    check that `rule` passes; checks run from the planned amount every `rule.step` epochs up to
    the cap. A pooling rule first measures the `pool` - 1 amounts a step apart before the
    planned one (where they are >= 0): they inform the first check but ship nothing."""
    history: list[Measurement] = []
    earlier = [round(planned - k * rule.step, 9) for k in range(rule.pool - 1, 0, -1)]
    for amount in [a for a in earlier if a >= -1e-9]:
        history.append((yield amount))
    checks = []
    for amount in check_amounts(planned, rule.step, rule.cap):
        measured = yield amount
        checks.append((amount, measured))
        if rule.passes(measured, history):
            return Verification(True, amount, tuple(checks))
        history.append(measured)
    return Verification(False, checks[-1][0] if checks else planned, tuple(checks))


def verify(measure: Callable[[float], Measurement], planned: float,
           rule: ShippingRule) -> Verification:
    """Run `verification` with `measure(amount)`, which trains on to `amount` (ascending) and
    returns the validation measurement there."""
    steps = verification(planned, rule)
    try:
        amount = next(steps)
    except StopIteration as done:
        return done.value
    return resume(steps, amount, measure)


def resume(steps: Generator[float, Measurement, Verification], amount: float,
           measure: Callable[[float], Measurement]) -> Verification:
    """Run a started `verification` on from `amount`, the amount it asked for last."""
    try:
        while True:
            amount = steps.send(measure(amount))
    except StopIteration as done:
        return done.value

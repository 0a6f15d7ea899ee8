"""The trials record that `resilience` hands `plan` and `compare`: one row per (trial,
checkpoint). Written to trials.csv, and kept in MLflow as one child run per trial (params, and
the accuracy curves as metric histories), which is what a plan reads back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from reduce_ops.errors import TrackingError
from reduce_ops.names import (
    RETRAINING_EPOCHS,
    TAG_REUSED_FROM,
    TAG_TRIAL,
    TEST_ACCURACY,
    TRIAL_SECONDS,
    VAL_ACCURACY,
    VAL_GAINED,
    VAL_LOST,
)
from reduce_ops.tracking.runs import read_children

# Metric steps of a trial's curve are milli-epochs: step 250 = 0.25 epochs of retraining.
STEPS_PER_EPOCH_UNIT = 1000
TRIAL_COLUMNS = ["fault_rate", "repetition", "fault_seed", "n_faulty", "pruned_fraction",
                 "amount", "val_accuracy", "test_accuracy", "val_lost", "val_gained"]
# val_lost / val_gained: validation images the baseline classifies right and the trial's model
# wrong / the other way round (what a paired decision against the baseline reads)
FILE = "trials.csv"


@dataclass(frozen=True)
class TrialSpec:
    """One (fault rate, repetition) and the seed of its random fault map."""

    fault_rate: float
    repetition: int
    fault_seed: int

    @property
    def key(self) -> str:
        """r0.1000-rep0; a rate that 4 decimals do not hold exactly is written in full
        (r0.10004-rep0), so that two rates never share a key."""
        rate = f"{self.fault_rate:.4f}"
        if float(rate) != self.fault_rate:
            rate = repr(float(self.fault_rate))
        return f"r{rate}-rep{self.repetition}"


@dataclass
class TrialResult:
    """A finished trial: its map's size and the accuracy at every checkpoint amount."""

    spec: TrialSpec
    n_faulty: int
    pruned_fraction: float
    amounts: list[float]
    val_accuracy: list[float]
    test_accuracy: list[float]
    seconds: float
    grid_epochs: float            # resilience.max_epochs; amounts beyond it are the extension
    reused_from: str = ""
    val_lost: list[int] = field(default_factory=list)     # per amount (empty: not recorded)
    val_gained: list[int] = field(default_factory=list)
    # when it ran, not what it found (two runs of one trial compare equal): time.time() it
    # started (0: not recorded) and of each measurement
    started: float = field(default=0.0, compare=False)
    times: list[float] = field(default_factory=list, compare=False)

    @property
    def extended(self) -> bool:
        return self.amounts[-1] > self.grid_epochs + 1e-9


def table(results: list[TrialResult]) -> pd.DataFrame:
    """Long table: one row per (trial, checkpoint), sorted by rate, repetition, amount."""
    rows = [(r.spec.fault_rate, r.spec.repetition, r.spec.fault_seed, r.n_faulty,
             r.pruned_fraction, a, v, t, lost, gained)
            for r in results for a, v, t, lost, gained in zip(
                r.amounts, r.val_accuracy, r.test_accuracy,
                r.val_lost or [-1] * len(r.amounts), r.val_gained or [-1] * len(r.amounts))]
    df = pd.DataFrame(rows, columns=TRIAL_COLUMNS)
    return df.sort_values(["fault_rate", "repetition", "amount"], ignore_index=True)


def run_name(spec: TrialSpec) -> str:
    """A trial's run name, e.g. 'rate 0.1000 rep 0' (its key is the tag reduce_ops.trial)."""
    return f"rate {spec.fault_rate:.4f} rep {spec.repetition}"


def run_span(r: TrialResult) -> tuple[float, float] | None:
    """When the trial's work started and ended (None: not recorded)."""
    return (r.started, r.times[-1]) if r.started and r.times else None


def run_payload(r: TrialResult) -> tuple[dict, dict, dict]:
    """(params, metric histories, tags) of a trial's child run; steps are milli-epochs, each
    point with the time it was measured when recorded. `fault_rate` is a metric too, so that
    the UI's charts can put accuracy against it."""
    params = {"fault_rate": r.spec.fault_rate, "repetition": r.spec.repetition,
              "fault_seed": r.spec.fault_seed, "n_faulty": r.n_faulty,
              "pruned_fraction": r.pruned_fraction, "step_unit": "milli-epochs",
              "grid_epochs": r.grid_epochs, "measured_epochs": r.amounts[-1],
              "extended": r.extended}
    steps = [int(round(a * STEPS_PER_EPOCH_UNIT)) for a in r.amounts]
    times = r.times if len(r.times) == len(steps) else None

    def points(values: list) -> list[tuple]:
        return list(zip(steps, values, times)) if times else list(zip(steps, values))

    history = {VAL_ACCURACY: points(r.val_accuracy),
               TEST_ACCURACY: [p for p in points(r.test_accuracy) if not math.isnan(p[1])],
               RETRAINING_EPOCHS: points(r.amounts), VAL_LOST: points(r.val_lost),
               VAL_GAINED: points(r.val_gained), TRIAL_SECONDS: [(0, r.seconds)],
               "fault_rate": [(0, r.spec.fault_rate)]}
    tags = {TAG_TRIAL: r.spec.key}
    if r.reused_from:
        tags[TAG_REUSED_FROM] = r.reused_from
    return params, history, tags


def from_run(child: dict[str, Any]) -> TrialResult:
    """Rebuild a TrialResult from a child run read back by read_children."""
    p, h = child["params"], child["histories"]
    val = sorted(h[VAL_ACCURACY])
    test = dict(h[TEST_ACCURACY])
    spec = TrialSpec(float(p["fault_rate"]), int(p["repetition"]), int(p["fault_seed"]))
    seconds = h.get(TRIAL_SECONDS, [(0, 0.0)])[-1][1]
    amounts = [s / STEPS_PER_EPOCH_UNIT for s, _ in val]
    lost, gained = dict(h.get(VAL_LOST, [])), dict(h.get(VAL_GAINED, []))
    paired = all(s in lost and s in gained for s, _ in val)
    measured_at = dict(child.get("times", {}).get(VAL_ACCURACY, []))
    return TrialResult(spec, int(p["n_faulty"]), float(p["pruned_fraction"]), amounts,
                       [v for _, v in val], [test.get(s, math.nan) for s, _ in val], float(seconds),
                       float(p.get("grid_epochs", amounts[-1])), reused_from=child["run_id"],
                       val_lost=[int(lost[s]) for s, _ in val] if paired else [],
                       val_gained=[int(gained[s]) for s, _ in val] if paired else [],
                       started=child.get("span", (0.0, 0.0))[0],
                       times=[measured_at[s] for s, _ in val] if measured_at else [])


TRIAL_METRICS = [VAL_ACCURACY, TEST_ACCURACY, TRIAL_SECONDS, VAL_LOST, VAL_GAINED]   # from_run


def read_logged(uri: str, run_id: str) -> pd.DataFrame:
    """The trials table of a logged resilience run, read back from its finished child runs."""
    children = read_children(uri, run_id, TRIAL_METRICS)
    if not children:
        raise TrackingError(f"resilience run {run_id} has no finished trials")
    return table([from_run(c) for c in children])

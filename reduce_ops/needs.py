"""Retraining needs of resilience trials: where one trial's monotone accuracy curve reaches a
level, whether a trial has settled there, and the resilience map (min / mean / max need per
fault rate)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from reduce_ops.errors import DataError

TRIAL_KEYS = ["fault_rate", "repetition"]
MAP_COLUMNS = ["level", "fault_rate", "n_reps", "n_reached", "n_never", "min", "mean", "max"]
DECISION_METRIC = "val_accuracy"     # every decision reads the validation split


def monotone_fit(amounts, accuracies) -> tuple[np.ndarray, np.ndarray]:
    """(sorted amounts, isotonic fit): the non-decreasing curve closest to one trial's measured
    accuracies (least squares). Fine-tuning does not make a model worse in expectation, so
    what the fit removes is measurement noise: a checkpoint that dips below its neighbours is
    pooled with them instead of counting on its own. NaN checkpoints (not measured) are dropped.
    """
    x = np.asarray(amounts, dtype=float).ravel()
    y = np.asarray(accuracies, dtype=float).ravel()
    if x.shape != y.shape:
        raise DataError(f"retraining curve: {x.size} amounts but {y.size} accuracies")
    if np.isnan(x).any() or (x < 0).any():
        raise DataError("retraining curve: amounts must be non-negative numbers")
    keep = ~np.isnan(y)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if x.size < 2:
        return x, y
    return x, isotonic(x, y)


def isotonic(x: np.ndarray, y: np.ndarray, increasing: bool = True) -> np.ndarray:
    """The least-squares monotone fit of y over x (ascending), as scikit-learn's
    IsotonicRegression fits it. Where the x are distinct, SciPy's pool-adjacent-violators fit
    with unit weights, the same values to the bit without scikit-learn's input checks (50 times
    the fit itself: 0.4 against 0.008 ms on 17 checkpoints; `compare` makes ~2,000 fits) or its
    import (0.6 s of each stage that plans); equal x, scikit-learn's, which pools them first."""
    if x.size > 1 and np.all(np.diff(x) > 0):
        try:
            from scipy.optimize import isotonic_regression
        except ImportError:                 # SciPy < 1.12
            pass
        else:
            return np.asarray(isotonic_regression(y, weights=np.ones_like(y),
                                                  increasing=increasing).x, dtype=float)
    from sklearn.isotonic import IsotonicRegression

    return np.asarray(IsotonicRegression(increasing=increasing).fit_transform(x, y),
                      dtype=float)


def retraining_needed(amounts, accuracies, level: float) -> float:
    """Retraining one trial needs to reach `level`: where its monotone fit first reaches it.

    Linear between checkpoints. The first measured amount (0.0 when amount 0 was measured) if
    the fit is at the level from the start; `math.inf` if it never gets there within the
    measured amounts. If the smallest measured amount is above 0 and already reaches the level,
    that amount (not 0) is returned: nothing shows that less would do.
    """
    x, fit = monotone_fit(amounts, accuracies)
    reached = fit >= level
    if not reached.any():
        return math.inf
    i = int(np.argmax(reached))      # the fit is non-decreasing: reached from i on
    if i == 0:
        return float(x[0])
    frac = (level - fit[i - 1]) / (fit[i] - fit[i - 1])       # fit[i-1] < level <= fit[i]
    return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def settled(amounts, accuracies, level: float, confirm: float) -> bool:
    """Whether a trial can stop: its monotone fit reached `level` at least `confirm` epochs
    before its last measurement (so a lucky last checkpoint alone does not end it)."""
    need = retraining_needed(amounts, accuracies, level)
    return math.isfinite(need) and float(np.nanmax(amounts)) - need >= confirm - 1e-9


def _check_trials(trials: pd.DataFrame, metric: str) -> None:
    """Fail with one line when the trials table lacks a column or rows this module needs."""
    missing = [c for c in TRIAL_KEYS + ["amount", metric] if c not in trials.columns]
    if missing:
        raise DataError(f"trials table: missing column(s) {', '.join(missing)}")
    if trials.empty:
        raise DataError("trials table: no rows")


def trial_needs(trials: pd.DataFrame, level: float,
                metric: str = DECISION_METRIC) -> pd.DataFrame:
    """Retraining needed to reach `level`, one row per trial (fault_rate, repetition, needed)."""
    _check_trials(trials, metric)
    rows = [
        (rate, rep, retraining_needed(g["amount"].to_numpy(), g[metric].to_numpy(), level))
        for (rate, rep), g in trials.groupby(TRIAL_KEYS, sort=True)
    ]
    out = pd.DataFrame(rows, columns=TRIAL_KEYS + ["needed"])
    return out.astype({"fault_rate": float, "needed": float})


def resilience_map(trials: pd.DataFrame, levels,
                   metric: str = DECISION_METRIC) -> pd.DataFrame:
    """Per accuracy level and fault rate: min/mean/max need over the repetitions that reached it."""
    parts = []
    for level in np.atleast_1d(np.asarray(levels, dtype=float)):
        needs = trial_needs(trials, float(level), metric)
        for rate, g in needs.groupby("fault_rate", sort=True):
            v = g["needed"].to_numpy()
            ok = v[np.isfinite(v)]
            stats = (ok.min(), ok.mean(), ok.max()) if ok.size else (np.nan,) * 3
            parts.append((float(level), rate, v.size, ok.size, v.size - ok.size, *stats))
    out = pd.DataFrame(parts, columns=MAP_COLUMNS)
    return out.sort_values(["level", "fault_rate"], ignore_index=True)

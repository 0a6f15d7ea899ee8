"""The grouping study's lower bounds (benchmarks/grouping_study.py) never exceed the best
grouping, found by trying every partition of small fleets, for need curves of every shape."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from grouping_study import independent_bound, share_bound

EDGE = 0.45


def _rounded(need):
    """The plan's epochs at expected fused rates: need rounded up to quarter epochs, inf beyond
    the edge (what fused_plan's planned_at gives)."""
    return lambda u: np.where(np.asarray(u) <= EDGE + 1e-12,
                              np.ceil(need(np.clip(np.asarray(u), 0, None)) / 0.25) * 0.25, np.inf)


SHAPES = {"concave": _rounded(lambda u: 4 * np.sqrt(u)), "linear": _rounded(lambda u: 8 * u),
          "convex": _rounded(lambda u: 20 * u ** 2),
          "saturating": _rounded(lambda u: 3 * (1 - np.exp(-u / 0.05)))}


def _partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _partitions(rest):
        for i in range(len(p)):
            yield [*p[:i], [first, *p[i]], *p[i + 1:]]
        yield [[first], *p]


def _best_ratio(planned_at, rates: np.ndarray) -> float:
    """The least planned epochs over every grouping (expected fused rates), per-chip = 1."""
    best = min(sum(float(planned_at(np.array([1 - np.prod(1 - rates[g])]))[0]) for g in p)
               for p in _partitions(list(range(len(rates)))))
    return best / float(planned_at(rates).sum())


@pytest.mark.parametrize("shape", SHAPES)
def test_no_grouping_beats_either_bound(shape: str) -> None:
    planned_at = SHAPES[shape]
    rng = np.random.default_rng(7)
    for _ in range(8):
        rates = rng.uniform(0.01, 0.3, size=6)
        own = planned_at(rates)
        best = _best_ratio(planned_at, rates)
        assert independent_bound(planned_at, rates, own, EDGE) <= best + 1e-9
        assert share_bound(planned_at, rates, own, EDGE) <= best + 1e-9


def test_the_share_bound_says_a_convex_need_saves_nothing() -> None:
    """need = 20 u^2 unrounded: g(s) / s only grows, so every chip alone is the best grouping."""
    def planned_at(u):
        return np.where(np.asarray(u) <= EDGE + 1e-12, 20 * np.asarray(u) ** 2, np.inf)
    rates = np.array([0.05, 0.1, 0.15, 0.2])
    assert share_bound(planned_at, rates, planned_at(rates), EDGE, points=200001) == (
        pytest.approx(1.0, abs=2e-3))

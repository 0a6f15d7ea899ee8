"""A test floor's figures on hand-made per-chip tables."""

from __future__ import annotations

import math

import pytest

from reduce_ops.yields import floor_report


def test_yield_overkill_and_escapes_on_a_hand_made_table():
    # chip:        a      b      c      d      e      f
    shipped = [True, True, True, False, False, True]
    meets = [True, True, False, False, True, True]     # with the model each shipped with
    recoverable = [True, True, True, True, False, False]
    r = floor_report(shipped, meets, recoverable)
    assert (r.n_chips, r.n_recoverable, r.n_shipped) == (6, 4, 4)
    assert r.n_shipped_meeting == 3                    # a, b, f (f met though not recoverable)
    assert r.n_escapes == 1                            # c shipped and missed
    assert r.n_overkill == 1                           # d recoverable, not shipped
    assert r.yield_ == pytest.approx(3 / 4) and r.escape_rate == pytest.approx(1 / 4)
    assert r.overkill_rate == pytest.approx(1 / 4)
    assert 0 <= r.yield_low < r.yield_ < r.yield_high <= 1
    assert 0 <= r.escape_low < r.escape_rate < r.escape_high <= 1


def test_nothing_shipped_or_recoverable_gives_no_rate():
    r = floor_report([False, False], [False, False], [False, False])
    assert math.isnan(r.yield_) and math.isnan(r.escape_rate) and math.isnan(r.overkill_rate)
    with pytest.raises(ValueError):
        floor_report([True], [True, False], [True])

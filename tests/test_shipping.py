"""The shipping rule: levels from the baseline, the checks a chip gets, where it ships."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from reduce_ops.errors import ConfigError, DataError
from reduce_ops.shipping import (Measurement, ShippingRule, check_amounts, constraint_level,
                                 verify)


def _rule(level: float, margin: float = 0.005, step: float = 0.25, cap: float = 2.0
          ) -> ShippingRule:
    return ShippingRule(level, level, margin, step, cap)


def test_levels_come_from_the_baseline_on_each_split():
    rule = ShippingRule.from_baseline("drop", 0.01, 0.005, 0.25, 2.0, baseline_val=0.97,
                                      baseline_test=0.96)
    assert rule.decision_level == pytest.approx(0.96) and rule.constraint_level == pytest.approx(0.95)
    assert rule.ship_level == pytest.approx(0.965)
    absolute = ShippingRule.from_baseline("absolute", 0.9, 0.0, 0.25, 2.0, 0.97, 0.96)
    assert absolute.decision_level == absolute.constraint_level == 0.9
    with pytest.raises(ConfigError, match="constraint.kind"):
        constraint_level("relative", 0.01, 0.9)


def test_a_rule_round_trips_through_a_summary_and_a_broken_one_is_one_line():
    rule = _rule(0.96)
    assert ShippingRule.from_dict(rule.to_dict(), "summary.json") == rule
    with pytest.raises(DataError, match="summary.json: no complete shipping rule"):
        ShippingRule.from_dict({"decision_level": 0.9}, "summary.json")


def test_check_amounts_step_from_the_plan_to_the_cap():
    assert check_amounts(1.0, 0.5, 2.0) == [1.0, 1.5, 2.0]
    assert check_amounts(1.0, 0.4, 2.0) == [1.0, 1.4, 1.8, 2.0]    # the cap itself is checked
    assert check_amounts(2.0, 0.5, 2.0) == [2.0]


def test_verification_extends_a_chip_that_misses_and_rejects_one_at_the_cap():
    curve = {a: Measurement(v, 1000) for a, v in
             {1.0: 0.950, 1.25: 0.960, 1.5: 0.968, 1.75: 0.970, 2.0: 0.971}.items()}
    asked = []

    def measure(amount):
        asked.append(amount)
        return curve[amount]

    passed = verify(measure, 1.0, _rule(0.96))
    assert passed.passed and passed.epochs == 1.5 and passed.extended
    assert asked == [1.0, 1.25, 1.5]                 # stops at the first pass, in order
    assert [a for a, _ in passed.checks] == [1.0, 1.25, 1.5]
    assert passed.val_accuracy == 0.968
    first = verify(curve.get, 1.5, _rule(0.96))
    assert first.passed and first.epochs == 1.5 and not first.extended
    missed = verify(curve.get, 1.0, _rule(0.97))
    assert not missed.passed and missed.epochs == 2.0 and len(missed.checks) == 5


# ---- the guard band from the measured noise -----------------------------------------------------

def _paired(escape_rate: float, n: int = 1000) -> ShippingRule:
    """Drop of 1 point from a baseline at 0.970 on both splits of n images each."""
    return ShippingRule.from_baseline("drop", 0.01, 0.0, 0.25, 2.0, 0.970, 0.970, escape_rate,
                                      n, n)


def test_a_chip_whose_paired_lower_bound_clears_the_level_ships():
    """Paired band: z(0.9) = 1.2816 standard errors of (validation - test) differences, from
    the chip's disagreement with the baseline: lost 20 + gained 10 of 1000 images, d = -0.01,
    var = (30 + 1) / 1000 - 0.01^2 = 0.0309, se = sqrt(0.0309 * 2 / 1000) = 0.007861, band =
    0.010075; accuracy 0.960 - 0.010075 = 0.949925 < 0.960 (level): misses."""
    rule = _paired(0.1)
    lost_ten = Measurement(0.960, 1000, lost=20, gained=10)
    assert rule.band(lost_ten) == pytest.approx(1.2816 * math.sqrt(0.0309 * 2 / 1000), rel=1e-3)
    assert not rule.passes(lost_ten)
    close = Measurement(0.970, 1000, lost=3, gained=3)          # differs on 6 images only
    assert rule.band(close) == pytest.approx(1.2816 * math.sqrt(7 / 1000 * 2 / 1000), rel=1e-3)
    assert rule.passes(close)                                   # 0.970 - 0.0048 >= 0.960
    assert not _paired(0.1).passes(Measurement(0.962, 1000, lost=40, gained=32))   # far, noisy


def test_a_chip_that_misses_trains_on_then_is_rejected_at_the_cap():
    rule = _paired(0.1)
    curve = {1.0: Measurement(0.955, 1000, 30, 15), 1.25: Measurement(0.962, 1000, 25, 17),
             1.5: Measurement(0.970, 1000, 5, 5), 1.75: Measurement(0.9, 1000, 80, 10),
             2.0: Measurement(0.9, 1000, 80, 10)}
    shipped = verify(curve.get, 1.0, rule)
    assert shipped.passed and shipped.epochs == 1.5 and len(shipped.checks) == 3
    never = {a: Measurement(0.962, 1000, 28, 20) for a in (1.0, 1.25, 1.5, 1.75, 2.0)}
    rejected = verify(never.get, 1.0, rule)
    assert not rejected.passed and rejected.epochs == 2.0 and len(rejected.checks) == 5


def test_the_guard_band_shrinks_as_the_split_grows():
    bands = [_paired(0.1, n).band(Measurement(0.965, n, lost=round(0.02 * n),
                                              gained=round(0.015 * n)))
             for n in (250, 1000, 4000, 16000)]
    assert all(a > b for a, b in zip(bands, bands[1:]))
    assert bands[0] / bands[-1] == pytest.approx(8.0, rel=0.1)      # ~ 1 / sqrt(n)
    absolute = [ShippingRule.from_baseline("absolute", 0.95, 0.0, 0.25, 2.0, 0.97, 0.97, 0.1,
                                           n, n).band(Measurement(0.96, n)) for n in (500, 2000)]
    assert absolute[0] > absolute[1]


def test_a_larger_escape_rate_never_ships_fewer_chips():
    rng = np.random.default_rng(0)
    n = 1000
    chips = []
    for _ in range(300):
        lost, gained = int(rng.integers(0, 60)), int(rng.integers(0, 40))
        chips.append(Measurement(0.970 + (gained - lost) / n, n, lost, gained))
    shipped = [sum(_paired(e).passes(m) for m in chips) for e in (0.02, 0.05, 0.1, 0.2, 0.3, 0.45)]
    assert shipped == sorted(shipped) and shipped[0] < shipped[-1]
    for e1, e2 in ((0.05, 0.1), (0.1, 0.3)):                    # chip by chip, not only counts
        assert all(_paired(e2).passes(m) for m in chips if _paired(e1).passes(m))


def test_without_an_escape_rate_the_rule_is_the_flat_margin():
    rule = ShippingRule(0.96, 0.95, 0.005, 0.25, 2.0)
    assert rule.band(Measurement(0.97, 1000, 50, 40)) == 0.0
    assert rule.passes(Measurement(0.965, 1000)) and not rule.passes(Measurement(0.9649, 1000))


def test_a_decision_split_too_small_for_the_escape_rate_is_one_line(tiny_cfg):
    """digits: a few hundred validation images. At escape rate 0.01 even a model scoring like
    the baseline could not clear a 0.5-point drop."""
    cfg = dataclasses.replace(tiny_cfg, verify=dataclasses.replace(tiny_cfg.verify,
                                                                    escape_rate=0.01, margin=0.0),
                              constraint=dataclasses.replace(tiny_cfg.constraint, value=0.005))
    with pytest.raises(ConfigError, match=r"^verify\.escape_rate: 0\.01 needs a guard band"):
        ShippingRule.from_config(cfg, 0.95, 0.95, 360, 360)
    assert ShippingRule.from_config(dataclasses.replace(
        cfg, verify=dataclasses.replace(cfg.verify, escape_rate=0.3)), 0.95, 0.95, 20000, 20000)


@pytest.mark.parametrize("value", ["0", "0.5", "-0.1", "0.7"])
def test_an_escape_rate_outside_0_to_half_is_one_line_naming_the_key(value, tmp_path, capsys):
    from conftest import make_project

    from reduce_ops.cli import main

    params = make_project(tmp_path / "p")
    assert main(["plan", "--params", str(params), "--set", f"verify.escape_rate={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verify.escape_rate: must be" in err[0]

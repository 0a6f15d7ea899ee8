"""The shipping rule: levels from the baseline, the checks a chip gets, where it ships."""

from __future__ import annotations

import pytest

from reduce_ops.errors import ConfigError, DataError
from reduce_ops.shipping import ShippingRule, check_amounts, constraint_level, verify


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
    curve = {1.0: 0.950, 1.25: 0.960, 1.5: 0.968, 1.75: 0.970, 2.0: 0.971}
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

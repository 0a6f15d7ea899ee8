"""Reduce arithmetic on hand-made trials tables with hand-computed answers."""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from reduce_ops.errors import ConfigError, DataError
from reduce_ops.needs import (
    MAP_COLUMNS,
    isotonic,
    resilience_map,
    retraining_needed,
    trial_needs,
)
from reduce_ops.planning import (
    BEYOND_EDGE,
    NEED_COLUMNS,
    MonotoneCurve,
    aggregate_needs,
    fit_monotone_curve,
    fit_plan_curve,
    make_plan,
    parse_statistic,
    plan_fleet,
)
from reduce_ops.records.plan import PLAN_COLUMNS

AMOUNTS = [0.0, 1.0, 2.0, 3.0]


def make_trials(curves):
    """Long trials table from {(fault_rate, repetition): accuracies at AMOUNTS}."""
    rows = [
        dict(fault_rate=r, repetition=k, amount=a, val_accuracy=acc, test_accuracy=acc - 0.01,
             fault_seed=100 + k, trial_id=f"{r}-{k}")
        for (r, k), accs in curves.items()
        for a, acc in zip(AMOUNTS, accs)
    ]
    return pd.DataFrame(rows)


# ---- retraining_needed ---------------------------------------------------------------------------

def test_interpolates_between_checkpoints():
    assert retraining_needed([0, 1, 2], [0.5, 0.90, 0.98], 0.96) == pytest.approx(1.75)


def test_exact_hit_at_a_checkpoint():
    assert retraining_needed([0, 1, 2], [0.5, 0.90, 0.98], 0.90) == pytest.approx(1.0)


def test_reached_at_amount_zero_needs_nothing():
    assert retraining_needed([0, 1, 2], [0.97, 0.98, 0.99], 0.96) == 0.0


def test_never_reached_is_inf():
    assert retraining_needed([0, 1, 2], [0.5, 0.6, 0.7], 0.96) == math.inf


def test_unsorted_input_is_sorted_first():
    assert retraining_needed([2, 0, 1], [0.98, 0.5, 0.90], 0.96) == pytest.approx(1.75)


def test_a_dip_after_the_crossing_is_pooled_with_it():
    # the monotone fit pools 0.9 and the dip 0.75 into 0.825 (still above 0.8): the crossing
    # moves from 0.5 to 0.8 (0.7 + 0.1 / 0.125) instead of being lost
    assert retraining_needed([0, 1, 2, 3], [0.7, 0.9, 0.75, 0.95], 0.8) == pytest.approx(0.8)


def test_one_noisy_last_checkpoint_does_not_undo_the_crossing():
    """The case seen on a second machine: 0.970 at 3.75 epochs, then 0.964 at 4.0 (3 images
    under 0.967) made a sustained crossing infeasible; the monotone fit pools the two."""
    amounts = [3.0, 3.25, 3.5, 3.75, 4.0]
    acc = [0.962, 0.966, 0.968, 0.970, 0.964]
    need = retraining_needed(amounts, acc, 0.967)
    assert math.isfinite(need) and 3.25 < need < 3.75


def test_a_lucky_spike_does_not_count_as_reached():
    # 0.97 once at 1.0, then 0.94, 0.95: pooled to 0.9533 < 0.96; reached only from 3.0 on
    amounts = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert retraining_needed(amounts, [0.80, 0.97, 0.94, 0.95, 0.98], 0.96) == pytest.approx(
        3.0 + (0.96 - 0.9533333333) / (0.98 - 0.9533333333))


def test_settled_needs_the_crossing_confirmed():
    from reduce_ops.needs import settled

    amounts = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert settled(amounts, [0.9, 0.97, 0.97, 0.97, 0.97], 0.96, confirm=0.5)
    assert not settled(amounts, [0.9, 0.9, 0.9, 0.9, 0.97], 0.96, confirm=0.5)  # only at the end
    assert not settled(amounts, [0.9] * 5, 0.96, confirm=0.5)


def test_nan_checkpoint_is_skipped():
    assert retraining_needed([0, 1, 2], [0.5, np.nan, 0.98], 0.74) == pytest.approx(1.0)


def test_the_monotone_fit_is_scikit_learns_isotonic_regression_to_the_bit():
    """The fit each trial's need is read off equals scikit-learn's IsotonicRegression on it, to
    the bit: on distinct amounts (the fast path) and with a repeated amount, over curves with
    plateaus, ties, dips and accuracies rounded to a test split's resolution."""
    from sklearn.isotonic import IsotonicRegression

    from reduce_ops.needs import monotone_fit

    rng = np.random.default_rng(3)
    for case in range(3000):
        n = int(rng.integers(2, 30))
        x = np.sort(rng.choice(200, n, replace=False)) * 0.25
        if case % 10 == 0:
            x[n // 2] = x[n // 2 - 1]                     # a repeated amount
        y = np.clip(0.5 + rng.uniform(0, 0.05) * np.arange(n)
                    + rng.normal(0, rng.uniform(0.001, 0.1), n), 0, 1)
        y = np.round(y, int(rng.choice([3, 16])))
        order = np.argsort(x, kind="stable")
        want = IsotonicRegression(increasing=True).fit_transform(x[order], y[order])
        got_x, got = monotone_fit(x, y)
        assert np.array_equal(got_x, x[order])
        assert np.array_equal(got, want), case


def test_mismatched_curve_is_a_data_error():
    with pytest.raises(DataError):
        retraining_needed([0, 1], [0.5], 0.9)


# ---- trial_needs / resilience_map ----------------------------------------------------------------

@pytest.fixture
def trials():
    return make_trials({
        (0.1, 0): [0.95, 0.97, 0.98, 0.98],  # reaches 0.90 and 0.96 at once / at 0.5
        (0.1, 1): [0.80, 0.96, 0.98, 0.98],  # 0.90 at 0.625, 0.96 at 1.0
        (0.2, 0): [0.50, 0.90, 0.98, 0.98],  # 0.90 at 1.0, 0.96 at 1.75
        (0.2, 1): [0.50, 0.70, 0.85, 0.92],  # 0.90 at 2.714..., 0.96 never
    })


def test_trial_needs_one_row_per_trial(trials):
    needs = trial_needs(trials.sample(frac=1, random_state=0), 0.96)
    assert list(needs.columns) == ["fault_rate", "repetition", "needed"]
    assert needs["needed"].tolist() == pytest.approx([0.5, 1.0, 1.75, math.inf])


def test_trial_needs_other_metric(trials):
    val = trial_needs(trials, 0.95)
    test = trial_needs(trials, 0.95, metric="test_accuracy")  # test = val - 0.01
    assert val["needed"].iloc[0] == 0.0  # val 0.95 at amount 0
    assert test["needed"].iloc[0] == pytest.approx(0.5)  # test 0.94 -> 0.96 between 0 and 1


def test_trial_needs_missing_column_is_a_data_error(trials):
    with pytest.raises(DataError, match="val_accuracy"):
        trial_needs(trials.drop(columns="val_accuracy"), 0.9)


def test_resilience_map_counts_never_and_stats_over_reached(trials):
    m = resilience_map(trials, [0.96, 0.90])
    assert list(m.columns) == MAP_COLUMNS
    assert m["level"].tolist() == [0.90, 0.90, 0.96, 0.96]
    assert m["fault_rate"].tolist() == [0.1, 0.2, 0.1, 0.2]
    row = m.iloc[3]  # level 0.96, rate 0.2: one of two repetitions never reached
    assert (row.n_reps, row.n_reached, row.n_never) == (2, 1, 1)
    assert (row["min"], row["mean"], row["max"]) == pytest.approx((1.75, 1.75, 1.75))
    row = m.iloc[1]  # level 0.90, rate 0.2: needs 1.0 and 2 + 0.05/0.07
    assert row.n_never == 0
    assert row["max"] == pytest.approx(2 + 0.05 / 0.07)
    assert row["mean"] == pytest.approx((1.0 + 2 + 0.05 / 0.07) / 2)


def test_resilience_map_nan_stats_when_no_repetition_reached():
    m = resilience_map(make_trials({(0.5, 0): [0.1, 0.2, 0.3, 0.4]}), [0.9])
    assert m.iloc[0].n_never == 1 and m.iloc[0].n_reached == 0
    assert m[["min", "mean", "max"]].isna().all(axis=None)


# ---- aggregate_needs / parse_statistic -----------------------------------------------------------

@pytest.fixture
def needs():
    return pd.DataFrame({
        "fault_rate": [0.1] * 4 + [0.2] * 2,
        "repetition": [0, 1, 2, 3, 0, 1],
        "needed": [1.0, 2.0, 3.0, 6.0, 1.0, math.inf],
    })


def test_max_mean_and_quantile(needs):
    mx = aggregate_needs(needs, "max")
    mean = aggregate_needs(needs, "mean")
    q = aggregate_needs(needs, "q0.5")
    assert list(mx.columns) == NEED_COLUMNS
    assert mx["needed"].tolist() == [6.0, math.inf]      # 0.2: half its repetitions never reached
    assert mean["needed"].tolist() == [3.0, math.inf]
    assert q["needed"].tolist() == [3.0, math.inf]  # 'higher': never interpolates down to 2.5
    assert (mx["needed"] >= mean["needed"]).all()
    assert mx["n_reps"].tolist() == [4, 2] and mx["n_never"].tolist() == [0, 1]
    assert mx["reach_fraction"].tolist() == [1.0, 0.5]


def test_min_reached_plans_a_rate_most_repetitions_reached(needs):
    """k of n: with min_reached 0.5 the rate where 1 of 2 repetitions reached is planned, at the
    statistic over the repetitions that reached."""
    assert aggregate_needs(needs, "max", min_reached=0.5)["needed"].tolist() == [6.0, 1.0]
    assert aggregate_needs(needs, "max", min_reached=0.6)["needed"].tolist() == [6.0, math.inf]


def test_reach_fractions_are_fit_non_increasing_over_rates():
    """One unlucky rate (3 of 5 reached) between two good ones (5 of 5) is pooled with the next:
    both become 4 of 5, so at min_reached 0.8 neither cuts the feasible region."""
    rows = [(0.1, 1.0)] * 5 + [(0.2, 1.0)] * 3 + [(0.2, math.inf)] * 2 + [(0.3, 2.0)] * 5
    needs = pd.DataFrame(rows, columns=["fault_rate", "needed"])
    agg = aggregate_needs(needs, "max", min_reached=0.8)
    assert agg["reach_fraction"].tolist() == [1.0, 0.6, 1.0]
    assert agg["reach_fitted"].tolist() == pytest.approx([1.0, 0.8, 0.8])
    assert agg["needed"].tolist() == [1.0, 1.0, 2.0]
    assert aggregate_needs(needs, "max")["needed"].tolist() == [1.0, math.inf, math.inf]


def test_bad_min_reached_names_the_key(needs):
    with pytest.raises(ConfigError, match=r"^plan\.min_reached:"):
        aggregate_needs(needs, "max", min_reached=0.0)


def test_default_statistic_is_max(needs):
    pd.testing.assert_frame_equal(aggregate_needs(needs), aggregate_needs(needs, "max"))


@pytest.mark.parametrize("text, value", [("max", "max"), ("MEAN", "mean"), ("q0.9", 0.9),
                                         ("q1", 1.0), (0.5, 0.5), (1, 1.0)])
def test_parse_statistic(text, value):
    assert parse_statistic(text) == value


@pytest.mark.parametrize("bad", ["foo", "q0", "q1.5", "qx", "0.9", 0.0, 1.5, True, None])
def test_bad_statistic_is_one_line_config_error(bad):
    with pytest.raises(ConfigError, match=r"^plan\.statistic: expected") as e:
        parse_statistic(bad)
    assert "\n" not in str(e.value)


# ---- fit_monotone_curve --------------------------------------------------------------------------

def test_noisy_points_give_a_monotone_curve_never_below_them():
    rates = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    needed = [0.0, 0.8, 0.6, 1.5, 1.2, 2.5]
    c = fit_monotone_curve(rates, needed, max_amount=3.0)
    assert c.fitted == pytest.approx([0.0, 0.8, 0.8, 1.5, 1.5, 2.5])   # the running maximum
    assert np.all(c(np.array(rates)) >= np.array(needed))
    dense = c(np.linspace(-0.1, 0.5, 2001))
    assert np.all(np.diff(dense) >= 0)
    assert c(0.35) == pytest.approx(1.5) and c(0.45) == pytest.approx(2.0)  # linear in between
    assert c(-0.1) == pytest.approx(0.0)  # below the lowest rate: value there
    assert c.max_feasible_rate == 0.5 and c.max_amount == 3.0


def test_worst_case_is_never_averaged_down():
    """Worst-case needs [0, 1.0, 0.5]: the old isotonic fit planned 0.75 for the rate whose
    worst repetition needed 1.0; the fit must stay at 1.0 from there on."""
    c = fit_monotone_curve([0.0, 0.1, 0.2], [0.0, 1.0, 0.5], max_amount=4.0)
    assert c.fitted.tolist() == [0.0, 1.0, 1.0]
    assert c(0.1) == 1.0 and c(0.2) == 1.0


def test_unsorted_rates_are_sorted():
    c = fit_monotone_curve([0.2, 0.0, 0.1], [2.0, 0.0, 1.0], max_amount=3.0)
    assert c.rates.tolist() == [0.0, 0.1, 0.2]
    assert c(np.array([0.0, 0.1, 0.2])) == pytest.approx([0.0, 1.0, 2.0])


def test_rates_above_first_inf_are_infeasible():
    c = fit_monotone_curve([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, math.inf, math.inf], max_amount=3.0)
    assert c.max_feasible_rate == 0.2
    assert c(0.2) == pytest.approx(2.0)
    assert c(np.array([0.21, 0.3, 0.5])).tolist() == [math.inf] * 3


def test_finite_rate_after_a_gap_is_still_infeasible():
    c = fit_monotone_curve([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, math.inf, 2.5], max_amount=3.0)
    assert c.max_feasible_rate == 0.2
    assert c(0.4) == math.inf
    assert c.fitted.size == 2


def test_single_feasible_point_is_constant():
    c = fit_monotone_curve([0.1, 0.2], [1.5, math.inf], max_amount=3.0)
    assert c(np.array([0.0, 0.05, 0.1])) == pytest.approx([1.5] * 3)
    assert c(0.15) == math.inf


def test_nothing_feasible():
    c = fit_monotone_curve([0.1, 0.2], [math.inf, 1.0], max_amount=3.0)
    assert c.max_feasible_rate == -math.inf and c.fitted.size == 0
    assert c(np.array([0.0, 0.1])).tolist() == [math.inf, math.inf]


def test_duplicate_rates_are_a_data_error():
    with pytest.raises(DataError, match="unique"):
        fit_monotone_curve([0.1, 0.1], [1.0, 2.0], max_amount=3.0)


# ---- plan_fleet ----------------------------------------------------------------------------------

@pytest.fixture
def linear_curve():
    """need = 10 * rate on [0, 0.3], infeasible above 0.3; 3 epochs measured at most."""
    return fit_monotone_curve([0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 2.0, 3.0, math.inf], 3.0)


def chips(*rates):
    return pd.DataFrame({"chip_id": [f"c{i}" for i in range(len(rates))], "fault_rate": rates})


def test_rounds_up_to_granularity(linear_curve):
    plan = plan_fleet(linear_curve, chips(0.11, 0.1), granularity=0.25)
    assert list(plan.columns) == PLAN_COLUMNS
    assert plan["needed"].tolist() == pytest.approx([1.1, 1.0])
    assert plan["planned_epochs"].tolist() == [1.25, 1.0]  # exactly 1.0 is not bumped to 1.25
    assert plan["feasible"].tolist() == [True, True]


def test_safety_margin_scales_before_rounding(linear_curve):
    plan = plan_fleet(linear_curve, chips(0.1), granularity=0.25, safety_margin=1.3)
    assert plan["planned_epochs"].iloc[0] == 1.5  # 1.3 -> 1.5


def test_capped_at_max_amount(linear_curve):
    plan = plan_fleet(linear_curve, chips(0.29, 0.3), granularity=1.0, safety_margin=1.5)
    assert plan["planned_epochs"].tolist() == [3.0, 3.0]
    assert "capped at the budget cap" in plan["reason"].iloc[0]


def test_zero_need_gets_zero_epochs(linear_curve):
    plan = plan_fleet(linear_curve, chips(0.0), granularity=0.25, safety_margin=2.0)
    row = plan.iloc[0]
    assert row.needed == 0.0 and row.planned_epochs == 0.0 and row.feasible
    assert not np.signbit(row.planned_epochs)
    assert row.reason == "no retraining needed"


def test_infeasible_chip(linear_curve):
    plan = plan_fleet(linear_curve, chips(0.2, 0.52), granularity=0.25)
    row = plan.iloc[1]
    assert not row.feasible and math.isnan(row.planned_epochs) and row.needed == math.inf
    assert row.reason == ("fault rate 0.52 above the highest rate reachable within the budget "
                          "cap (0.3)")
    assert plan.iloc[0].feasible


def test_all_infeasible():
    c = fit_monotone_curve([0.1, 0.2], [math.inf, math.inf], max_amount=3.0)
    plan = plan_fleet(c, chips(0.0, 0.1, 0.5), granularity=0.25)
    assert not plan["feasible"].any() and plan["planned_epochs"].isna().all()
    assert plan["reason"].str.startswith("no measured fault rate").all()


def test_plan_from_trials_end_to_end(trials):
    agg = aggregate_needs(trial_needs(trials, 0.96), "max")  # 0.1 -> 1.0, 0.2 -> inf
    curve = fit_monotone_curve(agg["fault_rate"], agg["needed"], trials["amount"].max())
    plan = plan_fleet(curve, chips(0.05, 0.1, 0.15), granularity=0.5)
    assert plan["planned_epochs"].tolist()[:2] == [1.0, 1.0]
    assert plan["feasible"].tolist() == [True, True, False]


@pytest.mark.parametrize("kwargs, key", [
    (dict(granularity=0.0), "resilience.checkpoint_every"),
    (dict(granularity=-1.0), "resilience.checkpoint_every"),
    (dict(granularity=0.25, safety_margin=0.9), "plan.safety_margin"),
    (dict(granularity=0.25, safety_margin=math.nan), "plan.safety_margin"),
])
def test_bad_plan_parameters_name_the_key(linear_curve, kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        plan_fleet(linear_curve, chips(0.1), **kwargs)


def test_duplicate_chip_id_is_a_data_error(linear_curve):
    fleet = pd.DataFrame({"chip_id": ["a", "a"], "fault_rate": [0.1, 0.2]})
    with pytest.raises(DataError, match="duplicate chip_id"):
        plan_fleet(linear_curve, fleet, granularity=0.25)


def test_curve_is_a_frozen_dataclass(linear_curve):
    assert isinstance(linear_curve, MonotoneCurve)
    with pytest.raises(AttributeError):
        linear_curve.max_amount = 5.0


# ---- fit_plan_curve: the feasible edge between two measured rates -------------------------------

def edge_points(reached_at_03=3.0):
    """Rates 0.1/0.2 planned (reach 1.0, 0.8), 0.3 not (0.4 reached)."""
    return pd.DataFrame({"fault_rate": [0.1, 0.2, 0.3], "needed": [1.0, 2.0, math.inf],
                         "reach_fitted": [1.0, 0.8, 0.4], "reached_need": [1.0, 2.0, reached_at_03]})


def test_plan_curve_edge_is_interpolated_in_the_reach_fraction():
    """Reach 0.8 at 0.2 and 0.4 at 0.3 cross min_reached 0.7 a quarter of the way: 0.225; the
    need there is a quarter of the way from 2.0 to 0.3's need over the repetitions that reached."""
    c = fit_plan_curve(edge_points(), 4.0, min_reached=0.7)
    assert c.max_feasible_rate == pytest.approx(0.225)
    assert c(np.array([0.2, 0.225])).tolist() == pytest.approx([2.0, 2.25])
    assert c(np.array([0.23, 0.3])).tolist() == [math.inf, math.inf]


def test_plan_curve_edge_never_plans_less_than_the_last_planned_rate():
    c = fit_plan_curve(edge_points(reached_at_03=1.5), 4.0, min_reached=0.7)
    assert c(np.array([0.2, 0.21, 0.225])).tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("points, min_reached", [
    (edge_points(), 1.0),                          # worst case: every repetition must reach
    (edge_points(reached_at_03=math.inf), 0.7),    # none reached at 0.3: nothing to interpolate
    (edge_points().assign(reach_fitted=[1.0, 0.7, 0.4]), 0.7),   # 0.2 sits on the threshold
])
def test_plan_curve_edge_stays_at_the_last_planned_rate(points, min_reached):
    points.loc[points["reach_fitted"] < min_reached, "needed"] = math.inf
    last = points.loc[np.isfinite(points["needed"]), "fault_rate"].max()   # 0.1 at 1.0, else 0.2
    c = fit_plan_curve(points, 4.0, min_reached)
    assert c.max_feasible_rate == last and c(np.array([last + 1e-4]))[0] == math.inf


def test_plan_curve_needs_the_reach_columns():
    with pytest.raises(DataError, match=r"^aggregate needs: missing column\(s\) reach_fitted, "
                                        r"reached_need; run `reduce-ops plan` again$"):
        fit_plan_curve(edge_points().drop(columns=["reach_fitted", "reached_need"]), 4.0)


def test_make_plan_plans_chips_up_to_the_interpolated_edge():
    """Five repetitions per rate; at 0.3 two of five reach (fraction 0.4): at min_reached 0.7
    chips up to 0.2 + 0.1 * (1 - 0.7) / (1 - 0.4) = 0.25 are planned, at 1.0 none above 0.2."""
    reach, miss = [0.80, 0.90, 0.95, 0.96], [0.80, 0.85, 0.88, 0.90]
    curves = {(0.2, k): reach for k in range(5)}
    curves.update({(0.3, k): reach if k < 2 else miss for k in range(5)})
    trials = make_trials(curves)
    loose = make_plan(trials, chips(0.2, 0.24, 0.26), 0.95, "max", 0.25, 1.0, 3.0, 0.7)
    assert loose.curve.max_feasible_rate == pytest.approx(0.25)
    assert loose.plan["feasible"].tolist() == [True, True, False]
    assert loose.plan["planned_epochs"].tolist()[:2] == [2.0, 2.0]
    strict = make_plan(trials, chips(0.2, 0.24, 0.26), 0.95, "max", 0.25, 1.0, 3.0, 1.0)
    assert strict.plan["feasible"].tolist() == [True, False, False]


# ---- make_plan: one noisy checkpoint, the budget cap -------------------------------------------

def test_one_noisy_checkpoint_does_not_make_a_rate_infeasible():
    """Five repetitions at rate 0.2 all hover around the level at the end of the grid; one
    reads 3 images under it at its last checkpoint. The rate stays feasible, and rate 0.3
    (every repetition reached) is not discarded."""
    amounts = [0.0, 1.0, 2.0, 3.0, 3.75, 4.0]
    good = [0.90, 0.95, 0.965, 0.970, 0.971, 0.972]
    noisy = [0.90, 0.95, 0.965, 0.969, 0.970, 0.964]
    rows = []
    for rate, curves in ((0.2, [good] * 4 + [noisy]), (0.3, [good] * 5)):
        for rep, acc in enumerate(curves):
            rows += [dict(fault_rate=rate, repetition=rep, amount=a, val_accuracy=v,
                          test_accuracy=v) for a, v in zip(amounts, acc)]
    result = make_plan(pd.DataFrame(rows), chips(0.2, 0.3), 0.967, "max", 0.25, 1.0, cap=4.0)
    assert result.plan["feasible"].tolist() == [True, True]
    assert result.curve.max_feasible_rate == 0.3


def test_needs_beyond_the_budget_cap_are_infeasible(trials):
    # at level 0.90 one repetition at rate 0.2 needs 2.714 epochs
    wide = make_plan(trials, chips(0.1, 0.2), 0.90, "max", 0.25, 1.0, cap=3.0).plan
    narrow = make_plan(trials, chips(0.1, 0.2), 0.90, "max", 0.25, 1.0, cap=2.5).plan
    assert wide["feasible"].tolist() == [True, True]         # 0.2 needs 2.714 <= 3
    assert narrow["feasible"].tolist() == [True, False]      # ... > 2.5


# ---- the fleet's spare budget: chips beyond the edge trained to the cap -----------------------

def spare_budget_trials():
    """Five repetitions per rate: all reach at 0.2, two of five at 0.3, none at 0.4."""
    reach, miss = [0.80, 0.90, 0.95, 0.96], [0.80, 0.85, 0.88, 0.90]
    curves = {(0.2, k): reach for k in range(5)}
    curves.update({(0.3, k): reach if k < 2 else miss for k in range(5)})
    curves.update({(0.4, k): miss for k in range(5)})
    return make_trials(curves)


def test_spare_budget_trains_chips_beyond_the_edge_lowest_rate_first():
    """At min_reached 1.0 the edge is 0.2: chips at 0.1 and 0.2 are planned 2 epochs each. A
    budget of 2.5 epochs per chip over five chips is 12.5: 4 planned, room for two chips at the
    cap of 3 (0.25 and 0.28, not 0.29); the chip at 0.4 is where no repetition reached (none
    above 0.3 reach) and is never tried. The chips within the edge keep their plan."""
    fleet = chips(0.1, 0.2, 0.29, 0.25, 0.28, 0.4)
    without = make_plan(spare_budget_trials(), fleet, 0.95, "max", 0.25, 1.0, 3.0, 1.0).plan
    assert without["feasible"].tolist() == [True, True, False, False, False, False]
    plan = make_plan(spare_budget_trials(), fleet, 0.95, "max", 0.25, 1.0, 3.0, 1.0,
                     fleet_budget=12.5 / 6).plan
    assert plan["feasible"].tolist() == [True, True, False, True, True, False]
    assert plan["planned_epochs"].tolist()[:2] == without["planned_epochs"].tolist()[:2]
    assert plan["planned_epochs"].iloc[[3, 4]].tolist() == [3.0, 3.0]
    assert plan["reason"].iloc[3].startswith(BEYOND_EDGE)
    assert plan["reason"].iloc[2].endswith("and those beyond it of lower fault rate")
    assert plan["reason"].iloc[5].endswith("so the spare budget does not try it")
    assert plan.loc[plan["feasible"], "planned_epochs"].sum() <= 12.5


def test_no_chip_is_tried_where_no_repetition_reached():
    """Between 0.3 (two of five reached) and 0.4 (none) chips are tried; at and above 0.4, and
    above the grid, never, whatever the budget."""
    fleet = chips(0.1, 0.39, 0.4, 0.45)
    plan = make_plan(spare_budget_trials(), fleet, 0.95, "max", 0.25, 1.0, 3.0, 1.0,
                     fleet_budget=100.0).plan
    assert plan["feasible"].tolist() == [True, True, False, False]


def test_no_spare_budget_left_when_the_edge_plan_spends_it():
    """A budget below what the chips within the edge need takes nothing from them."""
    fleet = chips(0.1, 0.2, 0.25)
    plan = make_plan(spare_budget_trials(), fleet, 0.95, "max", 0.25, 1.0, 3.0, 1.0,
                     fleet_budget=1.0).plan
    assert plan["feasible"].tolist() == [True, True, False]
    assert plan["planned_epochs"].tolist()[:2] == [2.0, 2.0]


def test_a_larger_spare_budget_never_trains_fewer_chips():
    """The chip at 0.1 is planned 2 epochs; each chip beyond the edge takes the cap of 3: a
    budget of 2.0 per chip (6 in all) leaves room for one, 2.7 (8.1) for both."""
    fleet = chips(0.1, 0.25, 0.28)
    counts = []
    for budget in (0.0, 1.5, 2.0, 2.7, 10.0):
        plan = make_plan(spare_budget_trials(), fleet, 0.95, "max", 0.25, 1.0, 3.0, 1.0,
                         fleet_budget=budget).plan
        counts.append(int(plan["reason"].str.startswith(BEYOND_EDGE).sum()))
    assert counts == [0, 0, 1, 2, 2]


def test_chips_up_to_the_top_of_the_grid_are_tried_where_repetitions_reached_there():
    """Some repetitions reach at the highest measured rate (0.3): chips up to it are tried,
    none above it."""
    reach, miss = [0.80, 0.90, 0.95, 0.96], [0.80, 0.85, 0.88, 0.90]
    curves = {(0.2, k): reach for k in range(5)}
    curves.update({(0.3, k): reach if k < 2 else miss for k in range(5)})
    plan = make_plan(make_trials(curves), chips(0.1, 0.3, 0.31), 0.95, "max", 0.25, 1.0, 3.0,
                     1.0, fleet_budget=100.0).plan
    assert plan["feasible"].tolist() == [True, True, False]


def test_a_negative_fleet_budget_names_the_key():
    with pytest.raises(ConfigError, match=r"^plan\.fleet_budget: "):
        make_plan(spare_budget_trials(), chips(0.1, 0.25), 0.95, "max", 0.25, 1.0, 3.0, 1.0,
                  fleet_budget=-1.0)


def test_isotonic_is_scikit_learns_fit_to_the_bit() -> None:
    """Reach fractions (k of n repetitions) over distinct rates, non-increasing, and accuracy
    curves, non-decreasing: SciPy's fit equals scikit-learn's IsotonicRegression exactly; equal
    x go to scikit-learn itself."""
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(0)
    for _ in range(2000):
        k = int(rng.integers(2, 14))
        sizes = rng.integers(1, 8, size=k)
        reach = 1.0 - np.array([rng.integers(0, s + 1) for s in sizes]) / sizes
        rates = np.sort(rng.choice(np.linspace(0.0, 0.5, 51), size=k, replace=False))
        for y, increasing in ((reach, False), (rng.random(k), True)):
            want = IsotonicRegression(increasing=increasing).fit_transform(rates, y)
            assert isotonic(rates, y, increasing).tobytes() == np.asarray(want).tobytes()
    x, y = np.array([0.0, 0.1, 0.1, 0.2]), np.array([0.9, 0.5, 0.7, 0.6])
    assert np.array_equal(isotonic(x, y, False),
                          IsotonicRegression(increasing=False).fit_transform(x, y))


def test_planning_and_shipping_load_neither_scikit_learn_nor_scipy_stats() -> None:
    """Their imports cost ~0.6 s of every stage that plans or ships (the normal quantile is
    scipy.special.ndtri, which scipy.stats.norm.ppf is, to the bit)."""
    from scipy.special import ndtri
    from scipy.stats import norm

    q = np.concatenate([np.linspace(0.0, 1.0, 10001), [0.5, 0.8, 0.975, 1e-300, -0.1, 1.1]])
    assert np.array_equal(ndtri(q), norm.ppf(q), equal_nan=True)
    code = ("import sys, reduce_ops.stages.plan, reduce_ops.stages.compare, reduce_ops.binomial; "
            "print(sorted(m for m in ('sklearn', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.strip() == "[]"

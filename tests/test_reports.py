"""Figures and tables from small hand-made tables: valid PNGs, atomic writes, what gets drawn."""

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from reduce_ops import atomic
from reduce_ops.errors import DataError
from reduce_ops.needs import MAP_COLUMNS
from reduce_ops.planning import fit_monotone_curve, plan_fleet, spend_spare_budget
from reduce_ops.reports import compare as compare_figs
from reduce_ops.reports import plan as plan_figs
from reduce_ops.reports import resilience as resilience_figs

QUARTERS = [i / 4 for i in range(17)]  # 0, 0.25, ..., 4 epochs: the default checkpoint grid


def assert_png(path, folder):
    """A real PNG of a readable size, and nothing else (no temp file) left in the folder."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = mpimg.imread(path).shape[:2]
    assert h > 300 and w > 500
    assert sorted(p.name for p in folder.iterdir()) == [path.name]


def make_trials(rates=(0.0, 0.2, 0.4), reps=2, amounts=QUARTERS):
    """Trials table: accuracy falls with the fault rate, recovers with retraining."""
    rows = [
        dict(fault_rate=r, repetition=k, amount=a,
             val_accuracy=0.98 - r * math.exp(-a) - 0.01 * k,
             test_accuracy=0.97 - r * math.exp(-a) - 0.01 * k)
        for r in rates for k in range(reps) for a in amounts
    ]
    return pd.DataFrame(rows)


def curves(ax):
    """Data curves of an axes: lines with markers (reference lines have none)."""
    return [ln for ln in ax.get_lines() if ln.get_marker() not in (None, "None", "")]


# ---- select_amounts / accuracy table / Fig. 2a -------------------------------------------------

def test_select_amounts_on_the_quarter_grid_doubles():
    assert resilience_figs.select_amounts(QUARTERS) == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("amounts,k", [
    (QUARTERS, 4), (QUARTERS, 2), (np.linspace(0, 10, 41), 6), (np.linspace(0.5, 3, 11), 5),
    ([3, 0, 1, 2, 0], 6),
])
def test_select_amounts_properties(amounts, k):
    got = resilience_figs.select_amounts(amounts, max_curves=k)
    assert got == sorted(set(got))
    assert got[0] == min(amounts) and got[-1] == max(amounts)
    assert len(got) <= k and set(got) <= {float(a) for a in amounts}
    if len(set(amounts)) <= k:
        assert got == sorted({float(a) for a in amounts})


def test_select_amounts_rejects_fewer_than_two_curves():
    with pytest.raises(DataError, match="max_curves"):
        resilience_figs.select_amounts(QUARTERS, max_curves=1)


def test_accuracy_table_mean_min_max_by_hand():
    t = resilience_figs.accuracy_table(make_trials(rates=(0.2,), amounts=(0.0, 1.0)), "test_accuracy")
    row = t[t["amount"] == 0.0].iloc[0]
    assert row["n_reps"] == 2
    assert row["max"] == pytest.approx(0.77) and row["min"] == pytest.approx(0.76)
    assert row["mean"] == pytest.approx(0.765)


def test_accuracy_table_names_a_missing_amount():
    with pytest.raises(DataError, match="amount"):
        resilience_figs.accuracy_table(make_trials(), amounts=[0.0, 3.3])


def test_missing_metric_column_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="test_accuracy"):
        resilience_figs.plot_accuracy_vs_fault_rate(make_trials().drop(columns="test_accuracy"),
                                            tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


def test_fig2a_one_curve_per_selected_amount():
    fig = resilience_figs.accuracy_figure(make_trials())
    (ax,) = fig.axes  # no baseline/constraint: no zoom panel
    assert len(curves(ax)) == len(resilience_figs.select_amounts(QUARTERS)) == 6
    labels = [ln.get_label() for ln in curves(ax)]
    assert labels[0] == "0 (FAP only)" and labels[-1] == "4 epochs"
    # the curve of amount 0 is the mean over repetitions at each rate
    np.testing.assert_allclose(curves(ax)[0].get_ydata(), [0.965, 0.765, 0.565])


def test_fig2a_explicit_amounts_reference_lines_and_zoom(tmp_path):
    fig = resilience_figs.accuracy_figure(make_trials(), amounts=[1.0, 0.0], baseline=0.97, constraint=0.96)
    full, zoom = fig.axes[:2]
    assert [ln.get_label() for ln in curves(full)] == ["0 (FAP only)", "1 epoch"]
    flat = [ln for ln in full.get_lines() if ln not in curves(full)]
    assert sorted(ln.get_ydata()[0] for ln in flat) == [0.96, 0.97]
    lo, hi = zoom.get_ylim()
    assert lo < 0.96 and hi > 0.97 and hi - lo < 0.2  # zoomed on the band around the references
    out = resilience_figs.plot_accuracy_vs_fault_rate(make_trials(), tmp_path / "fig2a.png",
                                              baseline=0.97, constraint=0.96)
    assert out == tmp_path / "fig2a.png"
    assert_png(out, tmp_path)


# ---- Fig. 2b ------------------------------------------------------------------------------------

def make_map():
    """Two levels; 0.96 is partly reached at 0.2 and never at 0.4 (NaN stats)."""
    rows = [
        (0.95, 0.0, 3, 3, 0, 0.0, 0.0, 0.0),
        (0.95, 0.2, 3, 3, 0, 0.5, 1.0, 1.5),
        (0.95, 0.4, 3, 3, 0, 2.0, 2.5, 3.0),
        (0.96, 0.0, 3, 3, 0, 0.0, 0.25, 0.5),
        (0.96, 0.2, 3, 1, 2, 3.0, 3.0, 3.0),
        (0.96, 0.4, 3, 0, 3, math.nan, math.nan, math.nan),
    ]
    return pd.DataFrame(rows, columns=MAP_COLUMNS)


def test_fig2b_never_reached_points_are_drawn_at_the_top(tmp_path):
    fig = resilience_figs.needed_figure(make_map(), max_amount=4.0, constraint_level=0.96)
    ax = fig.axes[0]
    tri = [ln for ln in ax.get_lines() if ln.get_marker() == "^" and len(ln.get_xdata())]
    assert len(tri) == 1 and len(tri[0].get_ydata()) == 1
    assert 4.0 < tri[0].get_ydata()[0] < ax.get_ylim()[1]  # above max_amount, inside the axes
    hollow = [ln for ln in ax.get_lines() if ln.get_marker() == "o"
              and ln.get_markerfacecolor() == "white" and len(ln.get_xdata())]
    assert len(hollow) == 1 and hollow[0].get_ydata()[0] == 3.0
    assert "2/3" in [t.get_text() for t in ax.texts]
    assert any(ln.get_linestyle() == ":" and ln.get_ydata()[0] == 4.0 for ln in ax.get_lines())
    widths = {ln.get_label(): ln.get_linewidth() for ln in ax.get_lines()
              if "≥" in ln.get_label()}
    assert widths["accuracy ≥ 0.96 (constraint)"] > widths["accuracy ≥ 0.95"]
    assert_png(resilience_figs.plot_retraining_needed(make_map(), tmp_path / "b.png", 4.0), tmp_path)


def test_fig2b_all_never_reached_does_not_crash(tmp_path):
    m = make_map()
    m[["n_reached", "min", "mean", "max"]] = [0, math.nan, math.nan, math.nan]
    m["n_never"] = m["n_reps"]
    assert_png(resilience_figs.plot_retraining_needed(m, tmp_path / "b.png", 4.0, 0.95), tmp_path)


# ---- plan figure --------------------------------------------------------------------------------

def plan_inputs():
    points = pd.DataFrame(dict(fault_rate=[0.0, 0.1, 0.2, 0.3], needed=[0.0, 1.0, 2.5, math.inf],
                               n_reps=3, n_never=[0, 0, 0, 2],
                               min=[0.0, 0.5, 2.0, 3.5], max=[0.0, 1.0, 2.5, math.inf]))
    curve = fit_monotone_curve(points["fault_rate"], points["needed"], max_amount=4.0)
    chips = pd.DataFrame(dict(chip_id=["a", "b", "c", "d", "e"],
                              fault_rate=[0.02, 0.08, 0.15, 0.25, 0.35]))
    return points, curve, plan_fleet(curve, chips, granularity=0.25)


def test_plan_figure_places_chips_curve_and_infeasible_region(tmp_path):
    points, curve, plan = plan_inputs()
    ax = plan_figs.plan_figure(points, curve, plan, "max", 0.96).axes[0]
    by_label = {ln.get_label(): ln for ln in ax.get_lines()}
    fit = by_label["monotone fit"]
    assert curve.max_feasible_rate == 0.2
    assert fit.get_xdata().max() == pytest.approx(0.2)
    assert np.all(np.diff(fit.get_ydata()) >= -1e-12)  # drawn curve is monotone
    chips = by_label["chips planned (3)"]
    np.testing.assert_allclose(chips.get_ydata(), plan["planned_epochs"][plan["feasible"]])
    bad = by_label["chips rejected untrained (2)"]
    assert np.all(bad.get_ydata() > 4.0)
    never = by_label["not planned: too few\nrepetitions reached"]
    assert list(never.get_xdata()) == [0.3]
    assert [p.get_label() for p in ax.patches] == ["beyond the edge"]
    assert ax.patches[0].get_x() == pytest.approx(0.2)
    out = plan_figs.plot_plan_curve(points, curve, plan, tmp_path / "plan.png", "max", 0.96)
    assert_png(out, tmp_path)


def test_plan_figure_marks_chips_trained_on_the_spare_budget(tmp_path):
    """A third of the repetitions reached at 0.3: the chip at 0.25 is trained to the cap on
    the spare budget and drawn apart from the planned ones; the one at 0.35 stays rejected."""
    points, curve, plan = plan_inputs()
    points = points.assign(reach_fraction=1 - points["n_never"] / points["n_reps"])
    plan = spend_spare_budget(plan, points, 4.0, fleet_budget=10.0)
    by_label = {ln.get_label(): ln for ln in
                plan_figs.plan_figure(points, curve, plan, "max", 0.96).axes[0].get_lines()}
    spare = by_label["beyond the edge, to the cap\non the spare budget (1)"]
    assert list(spare.get_xdata()) == [0.25] and list(spare.get_ydata()) == [4.0]
    assert len(by_label["chips planned (3)"].get_xdata()) == 3
    assert list(by_label["chips rejected untrained (1)"].get_xdata()) == [0.35]


def test_plan_figure_with_nothing_feasible(tmp_path):
    points, _, _ = plan_inputs()
    points = points.assign(needed=math.inf).drop(columns=["min", "max"])
    curve = fit_monotone_curve(points["fault_rate"], points["needed"], max_amount=4.0)
    plan = plan_fleet(curve, pd.DataFrame(dict(chip_id=["a"], fault_rate=[0.1])), 0.25)
    assert_png(plan_figs.plot_plan_curve(points, curve, plan, tmp_path / "p.png", "q0.9", 0.96),
               tmp_path)


# ---- Fig. 3 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_policies", [1, 2, 4])
def test_policy_figure_one_panel_per_policy_plus_summary(tmp_path, n_policies):
    rng = np.random.default_rng(0)
    names = [f"fixed {k} epochs" for k in range(n_policies)]
    per_chip = pd.DataFrame([
        dict(policy=p, chip_id=f"c{i}", fault_rate=r, epochs=float(k), test_accuracy=a,
             shipped=a >= 0.93, meets_on_test=a >= 0.95)
        for k, p in enumerate(names)
        for i, (r, a) in enumerate(zip(rng.uniform(0, 0.5, 10), rng.uniform(0.9, 1.0, 10)))
    ])
    summary = per_chip.groupby("policy", sort=False).agg(
        n_shipped=("shipped", "sum"), n_meet_on_test=("meets_on_test", "sum"),
        total_epochs=("epochs", "sum")).reset_index()
    fig = compare_figs.policy_figure(per_chip, summary, 0.95)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == n_policies + 1
    first = summary.iloc[0]
    assert f"ships {first.n_shipped}/10, {first.n_meet_on_test} meet" in visible[0].get_title()
    labelled = [ln.get_label() for ln in visible[-1].get_lines()
                if not ln.get_label().startswith("_")]
    assert labelled == names
    shipped_points = [ln.get_ydata()[0] for ln in visible[-1].get_lines()][::2]
    assert shipped_points == summary["n_shipped"].tolist()
    out = compare_figs.plot_policy_comparison(per_chip, summary, tmp_path / "fig3.png", 0.95)
    assert_png(out, tmp_path)


# ---- write_csv_atomic ---------------------------------------------------------------------------

def test_write_csv_round_trips_exactly(tmp_path):
    df = pd.DataFrame(dict(chip_id=["chip-000", "chip-001", "chip-002"],
                           fault_rate=[0.1 + 0.2, 1 / 3, 1e-17],
                           planned_epochs=[math.pi * 1e10, 2.0 / 7, math.nan],
                           feasible=[True, False, True]))
    out = atomic.write_csv(df, tmp_path / "sub" / "plan.csv")
    assert out == tmp_path / "sub" / "plan.csv"
    back = pd.read_csv(out)
    pd.testing.assert_frame_equal(back, df, check_exact=True)
    assert back["fault_rate"][0] == 0.1 + 0.2  # not rounded to 0.3
    assert [p.name for p in out.parent.iterdir()] == ["plan.csv"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = atomic.write_csv(pd.DataFrame(dict(a=[1])), tmp_path / "t.csv")
    old = path.read_text()

    def broken(self, target, **kw):
        with open(target, "w") as f:
            f.write("half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError):
        atomic.write_csv(pd.DataFrame(dict(a=[2])), path)
    assert path.read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]

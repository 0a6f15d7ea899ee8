"""eFAT: fused maps are exact unions, rewards add up by hand, no group is infeasible, a group's
model has zero weight on every member's faulty PEs, and every member's champion is it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    THROUGH_GROUP,
    WAFER_FLEET,
    clone_project,
    make_project,
    run_stages,
    tiny_params,
)

from reduce_ops import registry
from reduce_ops.config import from_dict
from reduce_ops.errors import ConfigError
from reduce_ops.grouping import GroupCost, _packed, form_groups, fuse, refine
from reduce_ops.hardware import (
    ArrayGeometry,
    FaultMap,
    build_masks,
    load_fleet,
    uniform_fault_map,
    wafer_fleet,
)
from reduce_ops.records.groups import read_table as read_groups
from reduce_ops.tracking.registry import find_model_versions
from reduce_ops.tracking.store import tracking_uri


def _map(chip_id: str, cells: list[tuple[int, int]], shape=(4, 4)) -> FaultMap:
    faulty = np.zeros(shape, dtype=bool)
    for r, c in cells:
        faulty[r, c] = True
    return FaultMap(chip_id, faulty)


def _step(rates) -> np.ndarray:
    """Planned epochs by fault rate on a 4x4 array: 1 up to 2 faulty PEs, 2 up to 4, 4 up to 6,
    infeasible beyond."""
    r = np.asarray(rates, dtype=float) * 16
    return np.select([r <= 2, r <= 4, r <= 6], [1.0, 2.0, 4.0], math.inf)


def test_fusion_is_the_exact_union() -> None:
    a, b = _map("a", [(0, 0), (1, 1)]), _map("b", [(1, 1), (3, 2)])
    fused = fuse([a, b])
    assert fused.dtype == bool and fused.sum() == 3
    assert fused[0, 0] and fused[1, 1] and fused[3, 2]
    assert not (fused & ~(a.faulty | b.faulty)).any()


def test_reward_arithmetic_on_a_hand_made_fleet() -> None:
    """a and b share a PE: fused 3 PEs -> 2 epochs for both, against 1 + 1 alone: no saving.
    c and d are the same map: fused 2 PEs -> 1 epoch against 1 + 1: saves 1. e alone (5 PEs,
    4 epochs) would make any group it joins infeasible or dearer."""
    maps = [_map("a", [(0, 0), (1, 1)]), _map("b", [(1, 1), (3, 2)]),
            _map("c", [(2, 2), (2, 3)]), _map("d", [(2, 2), (2, 3)]),
            _map("e", [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2)])]
    own = _step([m.fault_rate for m in maps])
    assert own.tolist() == [1.0, 1.0, 1.0, 1.0, 4.0]
    groups = form_groups(maps, own, _step, max_size=4, sample_pes=16)
    by_members = {g.members: g for g in groups}
    assert set(by_members) == {("a",), ("b",), ("c", "d"), ("e",)}
    cd = by_members[("c", "d")]
    assert (cd.members_planned, cd.planned_epochs, cd.reward) == (2.0, 1.0, 1.0)
    assert cd.fault_rate == 2 / 16
    assert sum(g.planned_epochs for g in groups) == own.sum() - 1.0



def test_the_expected_objective_weighs_the_chance_that_a_group_misses() -> None:
    """h (5 PEs: 4 epochs, where half the resilience repetitions never reached) holds l's only
    faulty PE, so fusing them is free on the plan (4 + 1 -> 4 epochs). Expected epochs, cap 5:
    h alone 4 + 0.5 * (5 - 4) = 4.5, l alone 1; the pair 4 + 0.5 * (5 - 4 + 4.5 + 1) = 7.25 >
    5.5, so with `miss_at` h and l stay apart. c and d (identical, 2 PEs, never missing) fuse
    either way."""
    maps = [_map("h", [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]), _map("l", [(0, 2)]),
            _map("c", [(2, 2), (2, 3)]), _map("d", [(2, 2), (2, 3)])]
    own = _step([m.fault_rate for m in maps])

    def miss(rates):
        return np.where(np.asarray(rates) * 16 > 4, 0.5, 0.0)

    cost = GroupCost(_step, miss, 5.0)
    assert cost.alone(np.array([4.0, 1.0]), np.array([5 / 16, 1 / 16])).tolist() == [4.5, 1.0]
    assert cost.group(np.array([5 / 16]), 5.5).tolist() == [7.25]
    assert GroupCost(_step).group(np.array([5 / 16]), 5.5).tolist() == [4.0]
    planned = form_groups(maps, own, _step, max_size=4, sample_pes=16)
    assert {g.members for g in planned} == {("h", "l"), ("c", "d")}
    expected = form_groups(maps, own, _step, max_size=4, sample_pes=16, miss_at=miss, cap=5.0)
    assert {g.members for g in expected} == {("h",), ("l",), ("c", "d")}
    assert [g.planned_epochs for g in expected if g.members == ("h",)] == [4.0]   # epochs, not
    # the expected cost: groups.csv and fat plan what the run trains


def test_fused_plan_reads_the_chance_to_miss_from_the_reach_fraction() -> None:
    from reduce_ops.grouping import fused_plan

    points = pd.DataFrame({"fault_rate": [0.0, 0.1, 0.2, 0.3], "needed": [0.0, 1.0, 2.0, np.inf],
                           "reach_fitted": [1.0, 1.0, 0.6, 0.2]})
    curve, planned_at, miss_at = fused_plan(points, 5.0, 0.25, 1.0)
    assert curve.max_feasible_rate == 0.2
    assert planned_at(np.array([0.05, 0.15, 0.25])).tolist() == [0.5, 1.5, math.inf]
    assert miss_at(np.array([0.05, 0.15, 0.2])) == pytest.approx([0.0, 0.2, 0.4])

def test_no_group_is_infeasible_or_too_big() -> None:
    geometry = ArrayGeometry(16, 16)
    rng = np.random.default_rng(0)
    maps = [uniform_fault_map(geometry, float(r), int(s), f"c{i}")
            for i, (r, s) in enumerate(zip(rng.uniform(0.01, 0.2, 40), rng.integers(1e6, size=40)))]

    def planned_at(rates):     # flat up to 0.25, infeasible above: tempting to fuse, with a wall
        r = np.asarray(rates, dtype=float)
        return np.where(r <= 0.25, 1.0 + r, math.inf)

    own = planned_at([m.fault_rate for m in maps])
    groups = form_groups(maps, own, planned_at, max_size=3)
    assert sorted(c for g in groups for c in g.members) == sorted(m.chip_id for m in maps)
    assert any(len(g.members) > 1 for g in groups)
    for g in groups:
        assert len(g.members) <= 3
        assert g.fault_rate <= 0.25 and math.isfinite(g.planned_epochs)
        assert g.reward >= 0
    with pytest.raises(ConfigError, match="group.max_size: must be >= 1"):
        form_groups(maps, own, planned_at, max_size=0)


def test_refinement_moves_a_chip_out_of_a_group_that_a_merge_left_it_in() -> None:
    """c and d have the same map; a and b are disjoint from them and from each other. Started
    from [c, a] and [d, b] (4 faulty PEs each: 2 epochs, no saving), moving c next to d saves an
    epoch; the result is every chip once, 3 epochs in all."""
    maps = [_map("a", [(0, 0), (0, 1)]), _map("b", [(1, 0), (1, 1)]),
            _map("c", [(2, 2), (2, 3)]), _map("d", [(2, 2), (2, 3)])]
    own = _step([m.fault_rate for m in maps])
    words = np.stack([_packed(m.faulty) for m in maps])
    everyone = [np.array([j for j in range(4) if j != i]) for i in range(4)]
    groups = refine(words, own, [[2, 0], [3, 1]], GroupCost(_step), 4, everyone, 16, rounds=5)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
    cost = sum(own[g[0]] if len(g) == 1 else _step([fuse([maps[i] for i in g]).mean()])[0]
               for g in groups)
    assert cost == 3.0
    assert any(set(g) >= {2, 3} for g in groups)
    # no rounds: the groups as given
    assert refine(words, own, [[2, 0], [3, 1]], GroupCost(_step), 4, everyone, 16,
                  rounds=0) == [[2, 0], [3, 1]]


def test_refinement_never_plans_more_and_finds_more_on_a_wafer_fleet() -> None:
    def planned_at(rates):
        r = np.asarray(rates, dtype=float)
        return np.where(r <= 0.2, np.ceil((0.25 + 16 * r) * 4) / 4, math.inf)

    gains = []
    for seed in range(6):
        fleet = wafer_fleet(40, ArrayGeometry(64, 64), 10, 0.8, "uniform", 0.0, 0.3, seed, "c",
                            rate_spread=0.3)
        own = planned_at([m.fault_rate for m in fleet])
        maps, own = [m for m, o in zip(fleet, own) if math.isfinite(o)], own[np.isfinite(own)]
        greedy = form_groups(maps, own, planned_at, 8, refine_rounds=0)
        refined = form_groups(maps, own, planned_at, 8)
        assert sorted(c for g in refined for c in g.members) == sorted(m.chip_id for m in maps)
        assert all(len(g.members) <= 8 and math.isfinite(g.planned_epochs) for g in refined)
        assert all(g.reward >= 0 for g in refined)     # no group costs more than its members
        gains.append(sum(g.planned_epochs for g in greedy) - sum(g.planned_epochs
                                                                 for g in refined))
    assert min(gains) >= 0 and max(gains) > 0


def test_chips_of_a_wafer_draw_their_rates_around_the_wafers() -> None:
    fleet = wafer_fleet(40, ArrayGeometry(64, 64), 10, 0.8, "uniform", 0.0, 0.5, 3,
                        rate_spread=0.02)
    rates = np.array([m.fault_rate for m in fleet]).reshape(4, 10)
    assert (rates.max(axis=1) - rates.min(axis=1) <= 0.04 + 1 / 4096).all()
    assert rates.mean(axis=1).std() > 0.05          # wafers differ
    with pytest.raises(ConfigError, match=r"faultmaps\.rate_spread: must be <= 1\.0, got 1\.5"):
        from_dict({**tiny_params(["faultmaps.rate_spread=1.5"])})


def test_wafer_chips_share_defects_and_the_wafer_size_must_divide_the_fleet() -> None:
    fleet = wafer_fleet(20, ArrayGeometry(64, 64), 10, 0.8, "uniform", 0.1, 0.3, 1,
                        rate_spread=0.2)
    same = [(fleet[i].faulty & fleet[j].faulty).mean() for i in range(10) for j in range(i)]
    other = [(fleet[i].faulty & fleet[10 + j].faulty).mean() for i in range(10) for j in range(10)]
    assert np.mean(same) > 2 * np.mean(other)
    for m in fleet:
        assert abs(m.n_faulty - round(m.fault_rate * 64 * 64)) == 0
    with pytest.raises(ConfigError, match=r"faultmaps.chips_per_wafer \(7\) must divide "
                                          r"faultmaps.n_chips \(20\)"):
        from_dict({**tiny_params(["faultmaps.generator=wafer", "faultmaps.n_chips=20",
                                  "faultmaps.chips_per_wafer=7"])})


def test_a_group_size_below_one_is_one_line(tmp_path: Path, capsys) -> None:
    from reduce_ops.cli import main

    params = make_project(tmp_path / "p")
    assert main(["group", "--params", str(params), "--set", "group.max_size=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "group.max_size: must be >= 1, got 0" in err[0]


# --------------------------------------------------------------------------- the stages

@pytest.fixture(scope="module")
def grouped(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny wafer fleet, planned and grouped (the project test_execution.py starts from), then
    retrained in a clone (tests only read it)."""
    wafer = tiny_pipeline("wafer", WAFER_FLEET, THROUGH_GROUP)
    root = clone_project(wafer, tmp_path_factory.mktemp("efat") / "project")
    run_stages(root, "fat")
    return root


def test_group_models_are_zero_on_every_members_faults_and_members_are_champions(
        grouped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(grouped)
    groups = read_groups(grouped / "results/group/groups.csv")
    shared = groups[groups["n_members"] > 1]
    assert len(shared), "the wafer fleet must give grouping something to find"
    maps = {m.chip_id: m for m in load_fleet(grouped / "data/fleet", ArrayGeometry(16, 16))}
    chips = pd.read_csv(grouped / "results/fat/chips.csv", dtype={"group_id": str})
    for row in shared.itertuples():
        versions = [registry.champion(uri, c, "reduce-ops") for c in row.members]
        assert len({v.run_id for v in versions}) == 1         # one model, the group's run
        assert {v.tags["group_id"] for v in versions} == {row.group_id}
        assert versions[0].tags["fused_fault_rate"] == f"{row.fused_fault_rate:.4f}"  # as read
        for chip_id in row.members:                          # each against its OWN map
            model = registry.load_chip_model(chip_id, tracking_uri=uri)
            params = dict(model.named_parameters())
            masks = build_masks(model, maps[chip_id], ["conv", "linear"])
            for name, keep in masks.items():
                assert torch.count_nonzero(params[name].detach()[~keep]) == 0, (chip_id, name)
        member_rows = chips[chips["chip_id"].isin(row.members)]
        assert (member_rows["group_id"] == row.group_id).all()
        assert (member_rows["group_size"] == row.n_members).all()
    summary = json.loads((grouped / "results/fat/summary.json").read_text())
    group_summary = json.loads((grouped / "results/group/summary.json").read_text())
    assert summary["n_fat_runs"] == group_summary["n_runs"] < summary["n_planned"]


def test_chips_in_the_plans_interpolated_edge_train_alone(grouped: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused map never goes past the last fault rate the plan measured as planned, into the
    interpolated edge where fewer repetitions reached: the plan is made to end its measured
    rates at 0.2 (as if too few repetitions had reached at 0.3): its edge is then interpolated
    to about 0.28, and the chips above 0.2 that it still plans train alone."""
    from conftest import clone_project

    from reduce_ops.cli import main
    from reduce_ops.records import sets

    project = clone_project(grouped, tmp_path / "edge")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    points_csv = project / "results/plan/curve_points.csv"
    points = pd.read_csv(points_csv)
    above = points["fault_rate"] > 0.2 + 1e-9        # 0.3: 40 % reached, below min_reached
    points.loc[above, ["needed", "reach_fraction", "reach_fitted"]] = [math.inf, 0.4, 0.4]
    points.to_csv(points_csv, index=False)
    summary_json = project / "results/plan/summary.json"     # the edit, as a plan of its own
    summary = json.loads(summary_json.read_text())
    summary["files"]["curve_points.csv"] = sets.sha256(points_csv)
    summary_json.write_text(json.dumps(summary))
    plan = pd.read_csv(project / "results/plan/plan.csv", dtype={"chip_id": str})
    in_edge = set(plan[plan["feasible"] & (plan["fault_rate"] > 0.2)
                       & (plan["planned_epochs"] > 0)]["chip_id"])
    assert in_edge, "the fleet must have planned chips above 0.2"
    assert main(["group", "--params", str(project / "params.yaml")]) == 0
    groups = read_groups(project / "results/group/groups.csv")
    shared = groups[groups["n_members"] > 1]
    assert (shared["fused_fault_rate"] <= 0.2).all()
    assert not in_edge & {c for members in shared["members"] for c in members}
    alone = groups[groups["n_members"] == 1]
    assert in_edge <= {m[0] for m in alone["members"]}

def test_grouping_disabled_trains_every_chip_alone(grouped: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import clone_project

    from reduce_ops.cli import main

    project = clone_project(grouped, tmp_path / "alone")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    params = str(project / "params.yaml")
    off = ["--set", "group.enabled=false"]
    assert main(["group", "--params", params, *off]) == 0
    groups = read_groups(project / "results/group/groups.csv")
    assert (groups["n_members"] == 1).all()
    plan = pd.read_csv(project / "results/plan/plan.csv")
    assert sorted(groups["planned_epochs"]) == sorted(plan.loc[plan["feasible"],
                                                               "planned_epochs"])
    assert main(["fat", "--params", params, "--force", *off]) == 0
    chips = pd.read_csv(project / "results/fat/chips.csv")
    assert (chips["group_size"] == 1).all()
    summary = json.loads((project / "results/fat/summary.json").read_text())
    assert summary["n_fat_runs"] == summary["n_planned"] == int(plan["feasible"].sum())


def test_compare_counts_a_groups_epochs_once(grouped: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The eFAT policy: members of a group that passes ship with the group's model (the same
    validation and test accuracy), its epochs shared among them; chips on their own do what
    the plan's Reduce policy does with them."""
    from conftest import clone_project

    from reduce_ops.cli import main

    project = clone_project(grouped, tmp_path / "cmp")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    assert main(["compare", "--params", str(project / "params.yaml")]) == 0
    per_chip = pd.read_csv(project / "results/compare/per_chip.csv")
    efat = per_chip[per_chip["policy"] == "efat"].set_index("chip_id")
    reduce = per_chip[per_chip["policy"] == "reduce-mean"].set_index("chip_id")
    groups = read_groups(project / "results/group/groups.csv")
    assert sorted(efat.index) == sorted(reduce.index)
    for row in groups.itertuples():
        members = efat.loc[list(row.members)]
        if row.n_members == 1:
            pd.testing.assert_series_equal(efat.loc[row.members[0]].drop("policy"),
                                           reduce.loc[row.members[0]].drop("policy"),
                                           check_names=False)
        elif members["shipped"].all():
            assert members["val_accuracy"].nunique() == 1 and members["test_accuracy"].nunique() == 1
            assert members["epochs"].sum() == pytest.approx(members["epochs"].iloc[0]
                                                            * row.n_members)
    summary = pd.read_csv(project / "results/compare/summary.csv")
    assert "efat" in set(summary["policy"])


def test_a_group_that_misses_counts_its_epochs_in_a_resumed_fat(
        grouped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check misses (a guard band no model reaches): each group runs to the cap, then its
    members alone; a rerun that finds every chip registered for the plan reports the same
    epochs, the failed groups' included (each member's share is a tag of its model version)."""

    from conftest import clone_project, make_every_check_miss

    from reduce_ops.cli import main

    project = clone_project(grouped, tmp_path / "miss")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    make_every_check_miss(monkeypatch)
    args = ["fat", "--params", str(project / "params.yaml")]
    assert main([*args, "--force"]) == 0
    first = json.loads((project / "results/fat/summary.json").read_text())
    groups = read_groups(project / "results/group/groups.csv")
    shared = groups[groups["n_members"] > 1]
    cap = first["budget_cap"]
    assert first["n_shipped"] == 0
    assert first["failed_group_epochs"] == pytest.approx(cap * len(shared))
    assert first["total_epochs"] == pytest.approx(cap * (len(shared) + first["n_planned"]))
    uri = tracking_uri(project)
    member = shared["members"].iloc[0][0]
    tags = find_model_versions(uri, f"reduce-ops-{member}")[0].tags
    assert tags["failed_group_id"] == shared["group_id"].iloc[0]
    assert float(tags["failed_group_epochs"]) == pytest.approx(cap / shared["n_members"].iloc[0])
    assert main(args) == 0                       # resumed: every chip registered already
    again = json.loads((project / "results/fat/summary.json").read_text())
    assert again["n_trained"] == 0
    for key in ("total_epochs", "failed_group_epochs", "n_shipped", "n_planned"):
        assert again[key] == pytest.approx(first[key]), key

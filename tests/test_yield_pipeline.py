"""The shipping rule with a guard band from an escape rate, pooled checks, through the pipeline:
what fat ships obeys it, compare's test-floor figures and operating characteristic agree with
its per-chip rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_FAT, TINY_GRID, clone_project

from reduce_ops.planning import BEYOND_EDGE
from reduce_ops.records.plan import rule_from_summary
from reduce_ops.shipping import Measurement

# An absolute level the digits baseline clears by a few points, the guard band of escape rate
# 0.2 pooled over 2 checks (the default rule's shape), chips on their own.
BAND = [*TINY_FAT, *TINY_GRID, "resilience.fault_rates=[0.0, 0.2, 0.4]",
        "faultmaps.rate_max=0.4", "faultmaps.n_chips=6", "constraint.kind=absolute",
        "constraint.value=0.8", "verify.margin=0.0", "verify.escape_rate=0.2",
        "verify.pool=2", "group.enabled=false", "compare.fixed_epochs=[0.5]"]
STAGES = ["prepare", "pretrain", "faultmaps", "resilience", "plan", "group", "fat", "compare"]


@pytest.fixture(scope="module")
def project(tiny_pipeline) -> Path:
    return tiny_pipeline("band", BAND, STAGES)


def _rule(project: Path):
    path = project / "results/plan/summary.json"
    return rule_from_summary(json.loads(path.read_text()), str(path))


def test_the_plan_records_the_rule_with_its_band(project: Path) -> None:
    rule = _rule(project)
    assert (rule.escape_rate, rule.pool, rule.paired) == (0.2, 2, False)
    assert rule.decision_level == rule.constraint_level == 0.8
    assert rule.n_decision > 0 and rule.n_report > 0
    assert rule.band(Measurement(0.9, rule.n_decision)) > 0.0


def test_every_chip_compare_ships_pooled_its_checks_above_the_level(project: Path) -> None:
    rule = _rule(project)
    curves = pd.read_csv(project / "results/compare/curves.csv", dtype={"chip_id": str})
    per_chip = pd.read_csv(project / "results/compare/per_chip.csv", dtype={"chip_id": str})
    shipped = per_chip[(per_chip["policy"] == "reduce-mean") & per_chip["shipped"]]
    assert not shipped.empty
    for row in shipped.itertuples(index=False):
        c = curves[curves["chip_id"] == row.chip_id].set_index("amount")

        def at(amount: float) -> Measurement:
            r = c.loc[round(amount, 9)]
            return Measurement(r.val_accuracy, rule.n_decision, int(r.val_lost),
                               int(r.val_gained))

        before = [at(row.epochs - rule.step)] if row.epochs - rule.step >= 0 else []
        assert rule.passes(at(row.epochs), before)
        if before:                      # pooled: this check alone would not always do
            assert rule.pooled(at(row.epochs), before) == pytest.approx(
                (rule.lower(at(row.epochs)) + rule.lower(before[0])) / 2)


def test_fat_ships_only_what_the_rule_passes_and_says_so(project: Path) -> None:
    rule = _rule(project)
    chips = pd.read_csv(project / "results/fat/chips.csv", dtype={"chip_id": str})
    summary = json.loads((project / "results/fat/summary.json").read_text())
    assert summary["n_shipped"] == int((chips["status"] == "shipped").sum())
    for row in chips[chips["status"] == "rejected"].itertuples(index=False):
        if row.reason.startswith("plan:"):
            continue
        assert "guard band" in row.reason and f"{rule.ship_level:.4f}" in row.reason


def test_compare_floor_figures_and_the_operating_characteristic_agree(project: Path) -> None:
    out = project / "results/compare"
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=[""])
    oc = pd.read_csv(out / "operating_characteristic.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    reduce = summary[summary["policy"] == "reduce-mean"].iloc[0]
    default = oc[oc["is_default"]].iloc[0]
    # the operating characteristic's default point is the same Reduce run as compare's row
    assert default["n_shipped"] == reduce["n_shipped"]
    assert default["n_escapes"] == reduce["n_escapes"]
    assert default["total_epochs"] == pytest.approx(reduce["total_epochs"])
    assert metrics["policies"]["reduce-mean"]["n_recoverable"] == reduce["n_recoverable"]
    assert {"flat margin, one check", "band from escape_rate, one check",
            "band from escape_rate, pooled over 2 checks"} <= set(oc["family"])
    # a larger escape rate never ships fewer chips (same plan family, pooled)
    pooled = oc[oc["family"] == "band from escape_rate, pooled over 2 checks"]
    pooled = pooled.assign(rate=pooled["setting"].astype(float)).sort_values("rate")
    assert list(pooled["n_shipped"]) == sorted(pooled["n_shipped"])
    assert (out / "operating_characteristic.png").read_bytes()[:4] == b"\x89PNG"


def test_a_spare_fleet_budget_trains_chips_beyond_the_edge_and_verification_decides(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """With every repetition required (the edge at its lowest) and a budget that covers every
    chip at the cap, chips beyond the edge are planned the cap, trained and verified like any
    other; compare keeps the plan without the budget beside it (those chips rejected untrained)."""
    from reduce_ops.cli import main

    root = clone_project(project, tmp_path / "spare",
                         ["plan.min_reached=1.0", "plan.fleet_budget=100"])
    monkeypatch.chdir(root)
    for leaked in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(leaked, raising=False)
    for stage in ("plan", "group", "fat", "compare"):
        assert main([stage, "--params", str(root / "params.yaml")]) == 0
    rule = _rule(root)
    plan = pd.read_csv(root / "results/plan/plan.csv", dtype={"chip_id": str},
                       keep_default_na=False, na_values=[""])
    beyond = plan[plan["reason"].str.startswith(BEYOND_EDGE)]
    assert not beyond.empty and (beyond["planned_epochs"] == rule.cap).all()
    assert json.loads((root / "results/plan/summary.json").read_text())["n_beyond_edge"] == len(
        beyond)
    chips = pd.read_csv(root / "results/fat/chips.csv", dtype={"chip_id": str},
                        keep_default_na=False, na_values=[""]).set_index("chip_id")
    for cid in beyond["chip_id"]:
        row = chips.loc[cid]
        assert row["trained"] and row["actual_epochs"] == rule.cap
        assert row["status"] == "shipped" or "guard band" in row["reason"]
    per_chip = pd.read_csv(root / "results/compare/per_chip.csv", dtype={"chip_id": str},
                           keep_default_na=False, na_values=[""])
    within = per_chip[(per_chip["policy"] == "reduce-mean-within-edge")
                      & per_chip["chip_id"].isin(beyond["chip_id"])]
    assert len(within) == len(beyond)
    assert (within["rejected_by"] == "plan").all() and (within["epochs"] == 0).all()
    spent = per_chip[(per_chip["policy"] == "reduce-mean")
                     & per_chip["chip_id"].isin(beyond["chip_id"])]
    assert (spent["rejected_by"] != "plan").all()
    # a plan made for another budget is refused in one line, not used as it is
    capsys.readouterr()
    for stage in ("group", "fat", "compare"):
        assert main([stage, "--params", str(root / "params.yaml"),
                     "--set", "plan.fleet_budget=50"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith("was made for plan.fleet_budget 100 (now 50); run `reduce-ops "
                            "plan` again") and "\n" not in err

"""benchmarks/efat_study.py: curve points of a run at other fault rates merge into a kept run,
and which rates are planned is refitted over all of them as planning fits it; a kept --pipeline
run reads as eFAT's epochs against Reduce's and against the bound on its own fleet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from efat_study import curve_points, fleet_bound, pipeline  # noqa: E402

from reduce_ops.planning import aggregate_needs  # noqa: E402


def _needs(spec: dict[float, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([(r, n) for r, ns in spec.items() for n in ns],
                        columns=["fault_rate", "needed"])


def _keep(root: Path, spec: dict[float, list[float]], min_reached: float) -> Path:
    out = root / "resnet18-seed0"
    out.mkdir(parents=True)
    aggregate_needs(_needs(spec), "mean", min_reached).to_csv(out / "curve_points.csv",
                                                               index=False)
    return out


def test_merged_points_equal_one_run_over_all_rates(tmp_path: Path) -> None:
    first = {0.0: [0.0, 0.0], 0.2: [0.5, 0.7], 0.4: [np.inf, 0.9]}
    later = {0.1: [0.4, 0.6], 0.5: [1.0, 1.2], 0.2: [0.1, 0.1]}
    out = _keep(tmp_path / "main", first, 0.6)
    _keep(tmp_path / "extra", later, 0.6)
    assert np.isinf(pd.read_csv(out / "curve_points.csv")["needed"].iloc[-1])  # 0.4 alone: 1 of 2
    merged = curve_points(out, [tmp_path / "extra"], 0.6)
    # the run in OUT keeps its own rate 0.2; the others come from the later run
    whole = aggregate_needs(_needs({**later, **first}), "mean", 0.6)
    pd.testing.assert_frame_equal(merged[whole.columns], whole, check_dtype=False)
    assert list(merged["fault_rate"]) == [0.0, 0.1, 0.2, 0.4, 0.5]
    # 0.4 (1 of 2 reached) is pooled with 0.5 (2 of 2): planned once both are there
    assert merged["needed"].tolist() == [0.0, 0.5, 0.6, 0.9, 1.1]

def test_no_merge_reads_the_kept_points_as_they_are(tmp_path: Path) -> None:
    out = _keep(tmp_path / "main", {0.0: [0.0], 0.2: [0.5]}, 0.6)
    kept = pd.read_csv(out / "curve_points.csv")
    pd.testing.assert_frame_equal(curve_points(out, [tmp_path / "absent"], 0.6), kept)


def _kept_pipeline(out: Path, efat_meets: list[bool]) -> None:
    """A kept --pipeline run: two chips, Reduce ships and meets on both, eFAT as given."""
    out.mkdir(parents=True)
    spec = {0.0: [0.0, 0.0], 0.1: [1.0, 1.2], 0.2: [1.4, 1.5], 0.3: [1.6, 1.8]}
    aggregate_needs(_needs(spec), "mean", 0.6).to_csv(out / "curve_points.csv", index=False)
    pd.DataFrame({"chip_id": ["chip-0", "chip-1"], "fault_rate": [0.08, 0.12]}).to_csv(
        out / "fleet.csv", index=False)
    rows = [("reduce-mean", c, True, True) for c in ("chip-1", "chip-0")]
    rows += [("efat", c, True, m) for c, m in zip(("chip-0", "chip-1"), efat_meets)]
    rows += [("fixed-1", c, False, False) for c in ("chip-0", "chip-1")]
    pd.DataFrame(rows, columns=["policy", "chip_id", "shipped", "meets_on_test"]).to_csv(
        out / "per_chip.csv", index=False)
    policies = {"reduce-mean": {"total_epochs": 2.5, "n_shipped": 2, "n_meet_on_test": 2},
                "efat": {"total_epochs": 1.5, "n_shipped": 2,
                         "n_meet_on_test": sum(efat_meets)}}
    (out / "compare.json").write_text(json.dumps({"policies": policies}))
    (out / "group.json").write_text(json.dumps({"epochs_ratio": 0.55}))
    (out / "pretrain.json").write_text(json.dumps({"test_accuracy": 0.97}))
    (out / "run.json").write_text(json.dumps({"minutes": 30.0}))


STUDY = {"plan": {"statistic": "mean", "budget_cap": 5.0, "safety_margin": 1.0},
         "resilience": {"checkpoint_every": 0.25}, "faultmaps": {"generator": "uniform"}}


def test_a_kept_pipeline_run_reads_as_efat_against_reduce_and_the_bound(tmp_path: Path) -> None:
    _kept_pipeline(tmp_path / "same", [True, True])
    row = pipeline("resnet18", 0, Path("unused.yaml"), [], tmp_path / "same", STUDY)
    assert row["trained_ratio"] == 1.5 / 2.5 and row["planned_ratio"] == 0.55
    assert row["same_shipped"] and row["same_meet_on_test"]     # per chip, whatever the order
    rates = np.array([0.08, 0.12])
    bound = fleet_bound(pd.read_csv(tmp_path / "same" / "curve_points.csv"), rates, STUDY)
    assert 0 < bound < 1 and row["bound"] == bound
    assert row["above_bound"] == row["trained_ratio"] - bound
    # one chip that eFAT ships but that misses on test: the same chips shipped, not meeting
    _kept_pipeline(tmp_path / "miss", [True, False])
    row = pipeline("resnet18", 0, Path("unused.yaml"), [], tmp_path / "miss", STUDY)
    assert row["same_shipped"] and not row["same_meet_on_test"]
    # correlated maps (a wafer fleet): no bound for independent maps is claimed
    wafer = {**STUDY, "faultmaps": {"generator": "wafer"}}
    assert np.isnan(pipeline("resnet18", 0, Path("unused.yaml"), [], tmp_path / "same",
                             wafer)["bound"])

"""benchmarks/efat_study.py: curve points of a run at other fault rates merge into a kept run,
and which rates are planned is refitted over all of them as planning fits it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from efat_study import curve_points  # noqa: E402

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

"""Stuck-at chips in the pipeline (hardware.fault_model: stuck_at): the fleet keeps each chip's
stuck register bits, imports a test floor's stuck-at maps all or nothing, and FAT trains each
chip through its own forced bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DROP_PLAN, TINY_FAT, TINY_GRID, make_project

from reduce_ops.cli import main
from reduce_ops.hardware import ArrayGeometry, load_fleet
from reduce_ops.hardware.bitfaults import random_pe_stuck_map, write_pe_stuck_file
from reduce_ops.hardware.stuckfleet import load_stuck
from reduce_ops.tracking.store import tracking_uri

STUCK = ["hardware.fault_model=stuck_at", "group.enabled=false", "hardware.stuck_at.n_bits=2",
         "hardware.stuck_at.bits=[5, 6, 7]", *TINY_FAT, "resilience.fault_rates=[0.0, 0.2, 0.4]",
         *TINY_GRID, *DROP_PLAN, "compare.fixed_epochs=[0.25]"]


@pytest.fixture(scope="module")
def project(tiny_pipeline) -> Path:
    return tiny_pipeline("stuck", STUCK, ["prepare", "faultmaps", "pretrain", "resilience",
                                          "plan", "group", "fat"])


def test_the_fleet_keeps_each_chips_stuck_bits(project: Path) -> None:
    fleet = load_fleet(project / "data/fleet", ArrayGeometry(16, 16))
    stuck = load_stuck(project / "data/fleet", fleet)
    assert set(stuck) == {m.chip_id for m in fleet}
    for m in fleet:
        s = stuck[m.chip_id]
        assert np.array_equal(s.faulty.numpy(), m.faulty)
        assert s.n_stuck == 2 * m.n_faulty                     # n_bits per faulty PE
        stuck_bits = (~s.and_mask.numpy()).astype(np.uint8)
        assert not (stuck_bits & 0b00011111).any()             # only bits 5, 6, 7


def test_chips_train_through_their_own_stuck_bits(project: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from reduce_ops import registry
    from reduce_ops.data import load_prepared
    from reduce_ops.quant import QuantizedWeights
    from reduce_ops.training import evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    chips = pd.read_csv(project / "results/fat/chips.csv")
    shipped = chips[chips["status"] == "shipped"]
    assert len(shipped), "the setup must ship some stuck-at chip"
    fleet = {m.chip_id: m for m in load_fleet(project / "data/fleet", ArrayGeometry(16, 16))}
    stuck = load_stuck(project / "data/fleet", list(fleet.values()))
    data = load_prepared(project / "data/prepared")
    uri = tracking_uri(project)
    for row in shipped.head(2).itertuples():
        model = registry.load_chip_model(row.chip_id, tracking_uri=uri)   # the float masters
        bits = stuck[row.chip_id].stuck_bits(model, ["conv", "linear"])
        with QuantizedWeights(model, ["conv", "linear"], bits):           # as the chip reads it
            val, _ = evaluate(model, data.x["val"], data.y["val"])
        assert val == pytest.approx(row.val_accuracy)
        float_val, _ = evaluate(model, data.x["val"], data.y["val"])
        assert float_val != val         # the chip's forced bits are what the decision read


def test_stuck_at_maps_import_all_or_nothing(tmp_path: Path, capsys) -> None:
    import torch

    project = tmp_path / "p"
    params = make_project(project, STUCK)
    floor = project / "floor"
    floor.mkdir()
    geometry = ArrayGeometry(16, 16)
    for i in range(2):
        write_pe_stuck_file(random_pe_stuck_map(geometry, 0.1, torch.Generator().manual_seed(i),
                                                chip_id=f"die-{i}"), floor / f"die-{i}.csv")
    (floor / "die-9.csv").write_text("row,col,bit,value\n3,4,9,1\n")       # bit out of range
    capsys.readouterr()
    assert main(["faultmaps", "import", str(floor), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "die-9.csv" in err and "Traceback" not in err
    assert not (project / "data/fleet").exists()                 # nothing written
    assert "source: generate" in params.read_text()
    (floor / "die-9.csv").unlink()
    assert main(["faultmaps", "import", str(floor), "--params", str(params)]) == 0
    fleet = load_fleet(project / "data/fleet", geometry)
    assert [m.chip_id for m in fleet] == ["die-0", "die-1"]
    assert set(load_stuck(project / "data/fleet", fleet)) == {"die-0", "die-1"}
    assert "source: import" in params.read_text()


def test_stuck_at_hardware_refuses_efat(tmp_path: Path, capsys) -> None:
    params = make_project(tmp_path / "p", [s for s in STUCK if not s.startswith("group.")])
    assert main(["plan", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "group.enabled" in err[0] and "stuck_at" in err[0]

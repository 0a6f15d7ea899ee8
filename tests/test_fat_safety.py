"""`fat` notices what changed and never registers a chip twice (issue 24): the skip rule is keyed
on everything that decides a chip's model, two `fat` runs at once end with one version per
(chip, plan), a chip the fleet lost gives up its champion, and an interrupted `plan` leaves the
old plan whole.

One module fixture holds a planned tiny project; every test works on a clone of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import THROUGH_GROUP, TINY_FAT, TINY_GRID, clone_project, run_stages

from reduce_ops import names, registry
from reduce_ops.cli import main
from reduce_ops.errors import TrackingError
from reduce_ops.tracking.registry import find_model_versions
from reduce_ops.tracking.store import tracking_uri

# test_fleet.py's setup: 4 chips, some feasible, one beyond reach; chips train alone
SETUP = [*TINY_FAT, *TINY_GRID, "faultmaps.rate_max=0.6", "resilience.fault_rates=[0.0, 0.5, 0.6]",
         "resilience.accuracy_levels=[0.5]", "constraint.kind=absolute", "constraint.value=0.35",
         "group.enabled=false"]
PREFIX = "reduce-ops"


@pytest.fixture(scope="module")
def planned(tiny_pipeline) -> Path:
    return tiny_pipeline("fleet", SETUP, THROUGH_GROUP)


@pytest.fixture(scope="module")
def trained(planned: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = clone_project(planned, tmp_path_factory.mktemp("trained24") / "project")
    run_stages(root, "fat")
    return root


@pytest.fixture
def project(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clone of the trained project of this test's own, as the current folder."""
    root = clone_project(trained, tmp_path / "project")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(root)
    return root


def _run(root: Path, *argv: str) -> int:
    return main([*argv, "--params", str(root / "params.yaml")])


def _plan_id(root: Path) -> str:
    return json.loads((root / "results/plan/summary.json").read_text())["run_id"]


def _feasible(root: Path) -> list[str]:
    plan = pd.read_csv(root / "results/plan/plan.csv", dtype={"chip_id": str})
    return plan.loc[plan["feasible"], "chip_id"].tolist()


def _versions(root: Path, chip: str, plan_id: str | None = None) -> list:
    tags = {"plan_run_id": plan_id} if plan_id else None
    return find_model_versions(tracking_uri(root), names.registered_name(PREFIX, chip), tags)


def _chips(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "results/fat/chips.csv", dtype={"chip_id": str}).set_index("chip_id")


@pytest.mark.parametrize("change", ["fat.lr=0.05", "fat.seed=7", "hardware.layer_types=[conv]"])
def test_a_change_that_decides_the_models_retrains_the_chips(project: Path, change: str) -> None:
    """Same plan, other fat.* or layers: the chips are trained again (their registered models
    were made with the old values), and a rerun with the same values skips them again."""
    feasible = _feasible(project)
    before = {c: len(_versions(project, c)) for c in feasible}
    assert _run(project, "fat", "--set", change) == 0
    assert _chips(project).loc[feasible, "trained"].all()
    assert {c: len(_versions(project, c)) for c in feasible} == {c: n + 1
                                                                 for c, n in before.items()}
    assert _run(project, "fat", "--set", change) == 0
    assert not _chips(project).loc[feasible, "trained"].any()
    assert {c: len(_versions(project, c)) for c in feasible} == {c: n + 1
                                                                 for c, n in before.items()}


def test_two_fat_runs_at_once_register_each_chip_once(planned: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `reduce-ops fat` started together on one project and store: both succeed, and every
    chip ends with exactly one version for the plan, its champion when verified."""
    root = clone_project(planned, tmp_path / "project")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)      # the project's own store
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI")}
    argv = [sys.executable, "-m", "reduce_ops", "fat", "--params", str(root / "params.yaml")]
    procs = [subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    plan_id = _plan_id(root)
    for chip in _feasible(root):
        mine = _versions(root, chip, plan_id)
        assert len(mine) == 1, (chip, [(v.version, v.aliases) for v in mine])
        assert names.CHAMPION in mine[0].aliases or mine[0].tags["verified"] == "false"


def test_a_chip_the_fleet_lost_gives_up_its_champion(project: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A new fleet without the old chips (other ids): `fat` takes the old chips' champions
    away, and fetch says why instead of serving an old model."""
    shipped = _chips(project).query("status == 'shipped'").index.tolist()
    assert shipped
    new = ["--set", "faultmaps.id_prefix=unit"]
    for stage in ("faultmaps", "plan", "group", "fat"):
        assert _run(project, stage, *new) == 0, stage
    uri = tracking_uri(project)
    for chip in shipped:
        assert not any(names.CHAMPION in v.aliases for v in _versions(project, chip))
        with pytest.raises(TrackingError, match="retired.*not in the fleet"):
            registry.champion(uri, chip, PREFIX)
    capsys.readouterr()
    assert _run(project, "fetch", shipped[0]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not in the fleet of the current plan" in err


def test_fetch_notes_a_champion_of_another_plan(project: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    shipped = _chips(project).query("status == 'shipped'").index[0]
    assert _run(project, "plan") == 0            # a new plan, `fat` not run since
    capsys.readouterr()
    assert _run(project, "fetch", shipped) == 0
    err = capsys.readouterr().err
    assert "trained for plan" in err and "run `reduce-ops fat`" in err


def test_fetch_out_never_replaces_what_it_did_not_fetch(project: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    shipped = _chips(project).query("status == 'shipped'").index[0]
    out = project / "D"
    (out / "model").mkdir(parents=True)
    (out / "model/notes.txt").write_text("mine")
    capsys.readouterr()
    assert _run(project, "fetch", shipped, "--out", str(out)) == 2
    assert "did not write" in capsys.readouterr().err
    assert (out / "model/notes.txt").read_text() == "mine"
    (out / "model/notes.txt").unlink()
    (out / "chip_model.pt").write_text("mine too")
    assert _run(project, "fetch", shipped, "--out", str(out)) == 2
    assert "was not fetched by reduce-ops" in capsys.readouterr().err
    assert (out / "chip_model.pt").read_text() == "mine too"
    (out / "chip_model.pt").unlink()
    killed = out / ".model.fetch-999999999-deadbeef"       # a fetch SIGKILLed mid-download
    (killed / "model").mkdir(parents=True)
    for _ in range(2):                   # its own download is replaced by the next one
        assert _run(project, "fetch", shipped, "--out", str(out)) == 0
    assert "Downloading artifacts" not in capsys.readouterr().err      # no progress bars
    assert sorted(p.name for p in out.iterdir()) == ["chip_model.pt", "model"]
    assert (out / "model/MLmodel").is_file() and (out / "chip_model.pt").stat().st_size > 100
    (project / "F").write_text("a file")
    capsys.readouterr()
    assert _run(project, "fetch", shipped, "--out", str(project / "F")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a folder" in err
    assert _run(project, "fetch", "x' OR '1'='1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chip id" in err and "Traceback" not in err


def test_plan_interrupted_while_drawing_keeps_the_old_plan(project: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in `plan` while its figure is drawn: every file of results/plan is the old plan's,
    and `fat` goes on with that plan as a whole."""
    from reduce_ops.stages import plan as plan_stage

    folder = project / "results/plan"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def interrupted(points, curve, plan, path, **kwargs):
        Path(path).write_bytes(b"half a figure")
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_stage, "plot_plan_curve", interrupted)
    assert _run(project, "plan") == 130
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert _run(project, "fat") == 0
    assert not _chips(project)["trained"].any()      # the same plan: nothing to retrain


def test_a_plan_made_with_another_store_is_one_line(project: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """results/plan was made while MLFLOW_TRACKING_URI named another store: `group` and `fat`
    would record and register chips under a plan run this store has never seen."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    for stage in ("group", "fat"):
        capsys.readouterr()
        assert _run(project, stage) == 2, stage
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is not in" in err and "reduce-ops plan" in err

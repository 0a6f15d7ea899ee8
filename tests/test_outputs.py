"""Output folders never eat what a stage did not write (issue 24): a folder is replaced only when
its marker says this writer made it, configured paths may not hold one another, and the files
of one record change together (a reader notices a mixed set).

Every case runs on CPU in seconds: the stages used here (prepare, faultmaps) need no training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_project

from reduce_ops import atomic
from reduce_ops.cli import main
from reduce_ops.errors import ReduceOpsError


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (what must survive a refused write)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _one_line_error(capsys: pytest.CaptureFixture, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A tiny project folder with a user's own files in it."""
    params = make_project(tmp_path / "project")
    root = params.parent
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/keep.txt").write_text("a user's data\n")
    (root / "notes.txt").write_text("a user's notes\n")
    return root


# --------------------------------------------------------------------------- the writer

def test_atomic_dir_replaces_only_a_folder_its_own_kind_made(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic.atomic_dir(out, "faultmaps") as tmp:
        (tmp / "a.npy").write_text("1")
    assert atomic.owner_of(out) == "faultmaps"
    with atomic.atomic_dir(out, "faultmaps") as tmp:          # its own: replaced
        (tmp / "b.npy").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [atomic.MARKER, "b.npy"]
    with pytest.raises(ReduceOpsError, match="output of reduce-ops faultmaps, not prepare"), atomic.atomic_dir(out, "prepare"):
        pass
    assert (out / "b.npy").read_text() == "2"

    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(ReduceOpsError, match="did not write"), atomic.atomic_dir(user, "faultmaps"):
        pass
    assert _tree(user) == {"thesis.tex": b"years of work"}
    # nothing is left beside it either (no temporary folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "user"]


def test_atomic_dir_takes_an_empty_folder_and_a_legacy_output(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic.atomic_dir(empty, "prepare") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert atomic.owner_of(empty) == "prepare"
    legacy = tmp_path / "legacy"          # written before folders carried a marker
    legacy.mkdir()
    (legacy / "meta.json").write_text("{}")
    (legacy / "dataset.npz").write_bytes(b"x")
    test = atomic.only_files("meta.json", "dataset.npz")
    with atomic.atomic_dir(legacy, "prepare", test) as tmp:
        (tmp / "meta.json").write_text("{}")
    assert atomic.owner_of(legacy) == "prepare"
    legacy_plus = tmp_path / "legacy_plus"   # the same, plus a user's file: refused
    legacy_plus.mkdir()
    (legacy_plus / "meta.json").write_text("{}")
    (legacy_plus / "mine.txt").write_text("mine")
    with pytest.raises(ReduceOpsError, match="did not write"), atomic.atomic_dir(legacy_plus, "prepare", test):
        pass
    assert (legacy_plus / "mine.txt").read_text() == "mine"


def test_atomic_dir_error_leaves_old_folder_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic.atomic_dir(out, "plan") as tmp:
        (tmp / "plan.csv").write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_dir(out, "plan") as tmp:
        (tmp / "plan.csv").write_text("new")
        raise RuntimeError("disk full while drawing the figure")
    assert (out / "plan.csv").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_sweeps_temporaries_of_dead_writers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = tmp_path / ".out.tmp-999999999-deadbeef"        # no such pid
    dead.mkdir()
    (dead / "half.npy").write_text("half")
    alive = tmp_path / f".out.tmp-{os.getpid()}-cafecafe"  # a live writer's: kept
    alive.mkdir()
    with atomic.atomic_dir(out, "faultmaps"):
        pass
    assert not dead.exists() and alive.exists()


def test_a_file_where_a_folder_goes_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(ReduceOpsError, match="not a folder"), atomic.atomic_dir(out, "faultmaps"):
        pass
    assert out.read_text() == "a file"


# --------------------------------------------------------------------------- the stages

@pytest.mark.parametrize("argv, key", [
    (["faultmaps", "--set", "paths.fleet=."], "paths.fleet"),
    (["faultmaps", "--set", "paths.fleet=.."], "paths.fleet"),
    (["prepare", "--set", "paths.prepared=data"], "paths.prepared"),
    (["variants", "--set", "paths.variants=models"], "paths.variants"),
    (["faultmaps", "--set", "paths.fleet=results"], "paths.fleet"),
    (["faultmaps", "--set", "paths.results=data/fleet"], "paths.fleet"),
    (["prepare", "--set", "paths.prepared=data/fleet"], "paths.prepared"),
    (["faultmaps", "--set", "paths.fleet=results/plan/fleet"], "plan/"),
    (["faultmaps", "import", "data/fault_maps", "--set", "paths.fleet=data/fault_maps"],
     "paths.fleet"),
])
def test_an_output_path_that_holds_other_files_is_one_line_and_nothing_is_touched(
        project: Path, argv: list[str], key: str, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "models").mkdir()
    (project / "models/baseline.pt").write_bytes(b"a baseline")
    before = _tree(project)
    monkeypatch.chdir(project)
    assert main([*argv, "--params", str(project / "params.yaml")]) == 2
    _one_line_error(capsys, key)
    assert _tree(project) == before


def test_faultmaps_import_into_its_own_source_is_refused(
        project: Path, capsys: pytest.CaptureFixture) -> None:
    """The import source named as the fleet on the command line only (not the params file)."""
    maps = project / "floor"
    maps.mkdir()
    np.save(maps / "chip-a.npy", np.zeros((16, 16), bool))
    before = _tree(project)
    assert main(["faultmaps", "import", str(maps), "--set", f"paths.fleet={maps}",
                 "--params", str(project / "params.yaml")]) == 2
    _one_line_error(capsys, "paths.fleet")
    assert _tree(project) == before


def test_a_user_folder_at_the_fleet_path_is_never_replaced(
        project: Path, capsys: pytest.CaptureFixture) -> None:
    """paths.fleet names a folder of the user's (not a configured path): refused, kept."""
    mine = project / "data/mine"
    mine.mkdir(parents=True)
    (mine / "important.npy").write_bytes(b"mine")
    before = _tree(project)
    assert main(["faultmaps", "--set", "paths.fleet=data/mine",
                 "--params", str(project / "params.yaml")]) == 2
    _one_line_error(capsys, str(mine), "did not write")
    assert _tree(project) == before
    # the fleet's own folder is replaced as before, again and again
    for _ in range(2):
        assert main(["faultmaps", "--params", str(project / "params.yaml")]) == 0
    assert atomic.owner_of(project / "data/fleet") == "faultmaps"


def test_import_with_another_geometry_records_it_and_writes_params_last(
        project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`faultmaps import DIR --set hardware.rows=8 --set hardware.cols=8`: the params file then
    says 8x8 too (later stages read the fleet as it was written); when writing the fleet
    fails, the params file is left as it was."""
    params = project / "params.yaml"
    maps = project / "floor"
    maps.mkdir()
    np.save(maps / "chip-a.npy", np.zeros((8, 8), bool))
    np.save(maps / "chip-b.npy", np.eye(8, dtype=bool))
    text = params.read_text()

    from reduce_ops.hardware import fleetio

    def full_disk(*args, **kwargs):
        raise ReduceOpsError("data/fleet: no space left on device")

    monkeypatch.setattr(fleetio, "atomic_dir", full_disk)
    argv = ["faultmaps", "import", str(maps), "--set", "hardware.rows=8", "--set",
            "hardware.cols=8", "--params", str(params)]
    assert main(argv) == 2
    assert params.read_text() == text                      # nothing recorded
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0
    saved = yaml.safe_load(params.read_text())
    assert (saved["hardware"]["rows"], saved["hardware"]["cols"]) == (8, 8)
    assert saved["faultmaps"]["source"] == "import"
    assert main(["faultmaps", "--params", str(params)]) == 0   # re-import reads 8x8 maps


def test_a_key_given_twice_in_params_is_one_line(project: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    params = project / "params.yaml"
    params.write_text(params.read_text() + "faultmaps:\n  n_chips: 3\n")
    assert main(["faultmaps", "--params", str(params)]) == 2
    _one_line_error(capsys, "'faultmaps' given twice")
    assert not (project / "data/fleet").exists()


def test_a_params_file_that_is_not_utf8_is_one_line(project: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    params = project / "params.yaml"
    params.write_bytes(params.read_text().encode("utf-16"))
    assert main(["faultmaps", "--params", str(params)]) == 2
    _one_line_error(capsys, "not UTF-8")


# --------------------------------------------------------------------------- records as sets

def _plan_parts(epochs: float):
    import pandas as pd

    from reduce_ops.records import plan as plan_record
    from reduce_ops.shipping import ShippingRule

    chips = pd.DataFrame({"chip_id": ["a", "b"], "fault_rate": [0.1, 0.2],
                          "needed": [epochs, epochs], "planned_epochs": [epochs, epochs],
                          "feasible": [True, True], "reason": ["", ""]})
    points = pd.DataFrame({"fault_rate": [0.1, 0.2], "needed": [epochs, epochs]})
    summary = plan_record.PlanSummary(f"run-{epochs:g}", "res", ShippingRule(0.9, 0.9, 0.0, 0.25,
                                                                             1.0),
                                      "mean", "b", "d", {"total_planned_epochs": 2 * epochs})
    return chips, points, summary


def test_a_plan_interrupted_while_drawing_leaves_the_old_plan_whole(tmp_path: Path) -> None:
    """Ctrl-C (or a full disk) while the figure is drawn: every file is still the old plan's."""
    from reduce_ops.records import plan as plan_record

    out = tmp_path / "results/plan"
    plan_record.write(out, *_plan_parts(0.5), draw=lambda p: p.write_bytes(b"old figure"))
    before = _tree(out)

    def interrupted(path: Path) -> None:
        path.write_bytes(b"half a figure")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        plan_record.write(out, *_plan_parts(0.75), draw=interrupted)
    assert _tree(out) == before
    assert plan_record.read(out).run_id == "run-0.5"
    assert sorted(p.name for p in out.parent.iterdir()) == ["plan"]


def test_a_mixed_plan_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """plan.csv of one plan beside the summary of another (a copy, an older writer): the
    reader says so instead of handing on rows under the wrong run id."""
    from reduce_ops.errors import DataError
    from reduce_ops.records import plan as plan_record

    old, new = tmp_path / "old", tmp_path / "new"
    plan_record.write(old, *_plan_parts(0.5))
    plan_record.write(new, *_plan_parts(0.75))
    (old / "plan.csv").write_bytes((new / "plan.csv").read_bytes())
    with pytest.raises(DataError, match=r"plan\.csv: not the file summary\.json was written "
                                        r"with.*reduce-ops plan"):
        plan_record.read(old)
    (new / "curve_points.csv").unlink()
    with pytest.raises(DataError, match="no plan"):
        plan_record.read(new)


def test_mixed_or_broken_groups_record_is_one_line(tmp_path: Path) -> None:
    """groups.csv of another run, a summary.json that is not JSON or not a mapping, chips that
    are not in the fleet: one DataError line each, naming the file."""
    import pandas as pd

    from reduce_ops.errors import DataError
    from reduce_ops.hardware import FaultMap
    from reduce_ops.records import groups as groups_record
    from reduce_ops.records import plan as plan_record

    chips, points, summary = _plan_parts(0.5)
    plan = plan_record.Plan(chips, points, summary)
    fleet = [FaultMap("a", np.zeros((4, 4), bool)), FaultMap("b", np.zeros((4, 4), bool))]

    def table(members: list[str]) -> pd.DataFrame:
        return pd.DataFrame([(f"alone-{m}", m, 1, 0.0, 0.0, 0.5, 0.5, 0.0) for m in members],
                            columns=groups_record.GROUP_COLUMNS)

    out = tmp_path / "group"
    groups_record.write(out, table(["a", "b"]), {"plan_run_id": plan.run_id})
    assert len(groups_record.read(out, plan, fleet)) == 2
    other = tmp_path / "other"
    groups_record.write(other, table(["a", "b", "c"]), {"plan_run_id": plan.run_id})
    (out / "groups.csv").write_bytes((other / "groups.csv").read_bytes())
    with pytest.raises(DataError, match=r"groups\.csv: not the file"):
        groups_record.read(out, plan, fleet)
    for text in ("{not json", "[1, 2]"):
        (out / "summary.json").write_text(text)
        with pytest.raises(DataError, match=r"summary\.json: (unreadable|not a groups)"):
            groups_record.read(out, plan, fleet)
    # a record made for a fleet with more chips, plan included (no digests: an older writer)
    (other / "summary.json").write_text('{"plan_run_id": "run-0.5"}')
    plan3 = plan_record.Plan(pd.concat([chips, chips.iloc[:1].assign(chip_id="c")]), points,
                             summary)
    with pytest.raises(DataError, match=r"chips not in the fleet \(c\)"):
        groups_record.read(other, plan3, fleet)


def test_a_user_file_put_into_an_output_folder_is_never_deleted(
        project: Path, capsys: pytest.CaptureFixture) -> None:
    """data/fleet is the stage's own folder; a file a user drops into it later is not: the
    next run refuses to replace the folder (one line naming the file) instead of deleting it."""
    params = str(project / "params.yaml")
    assert main(["faultmaps", "--params", params]) == 0
    (project / "data/fleet/my-notes.txt").write_text("which chips came back from the lab")
    before = _tree(project)
    capsys.readouterr()
    assert main(["faultmaps", "--params", params]) == 2
    _one_line_error(capsys, "my-notes.txt", "did not write")
    assert _tree(project) == before
    (project / "data/fleet/my-notes.txt").unlink()
    assert main(["faultmaps", "--params", params]) == 0


def test_an_output_path_that_is_a_file_is_one_line(project: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    (project / "data").mkdir(exist_ok=True)
    (project / "data/prepared").write_text("a file of the user's")
    assert main(["prepare", "--params", str(project / "params.yaml")]) == 2
    _one_line_error(capsys, "data/prepared", "not a folder")
    assert (project / "data/prepared").read_text() == "a file of the user's"


def test_dvcs_gitignore_in_an_output_folder_is_kept(tmp_path: Path) -> None:
    """DVC lists a stage's file outputs in a .gitignore inside their folder (results/plan): it
    is not a stranger there, and the folder that replaces the old one keeps it."""
    out = tmp_path / "plan"
    out.mkdir()
    (out / "plan.csv").write_text("legacy")                 # written before markers
    (out / ".gitignore").write_text("/plan.csv\n")
    with atomic.atomic_dir(out, "plan", atomic.only_files("plan.csv")) as tmp:
        (tmp / "plan.csv").write_text("new")
    assert (out / ".gitignore").read_text() == "/plan.csv\n"
    (out / ".gitignore").write_text("/plan.csv\n/summary.json\n")   # dvc updated it
    with atomic.atomic_dir(out, "plan") as tmp:
        (tmp / "plan.csv").write_text("newer")
    assert (out / ".gitignore").read_text() == "/plan.csv\n/summary.json\n"
    assert (out / "plan.csv").read_text() == "newer"

"""Per-chip FAT (`reduce-ops fat`): a child run and a registered model per chip, resume, skip,
--force, and fetching a chip's model by id (same logits as the pt2 export, faulty weights 0).

Two module fixtures hold a planned project and a clone of it after one `fat` run; tests that
change a project work on a clone of their own, so the tests run in any order.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import THROUGH_GROUP, TINY_FAT, TINY_GRID, clone_project, run_stages

import reduce_ops
from reduce_ops import names, registry
from reduce_ops.cli import main
from reduce_ops.config import load_config
from reduce_ops.data import load_prepared
from reduce_ops.errors import DataError, TrackingError
from reduce_ops.fault_aware import fat_curve
from reduce_ops.hardware import ArrayGeometry, FaultMap, build_masks, uniform_fault_map
from reduce_ops.models import Preprocess, build_model
from reduce_ops.records import plan as plan_record
from reduce_ops.retraining import worker
from reduce_ops.shipping import ShippingRule
from reduce_ops.tracking.registry import find_model_versions
from reduce_ops.tracking.runs import find_runs
from reduce_ops.tracking.store import tracking_uri
from reduce_ops.training import evaluate

# 4 chips with fault rates in [0, 0.6]; at rate 0.6 a 16x16 array kills LeNet on digits (accuracy
# stays ~0.1), so the chip near 0.6 is infeasible and the others need at most 0.5 epochs.
SETUP = [*TINY_FAT, *TINY_GRID, "faultmaps.rate_max=0.6", "resilience.fault_rates=[0.0, 0.5, 0.6]",
         "resilience.accuracy_levels=[0.5]", "constraint.kind=absolute", "constraint.value=0.35",
         "group.enabled=false"]      # chips on their own here; eFAT groups: test_grouping.py
PREFIX = "reduce-ops"


@pytest.fixture(scope="module")
def planned(tiny_pipeline) -> Path:
    """A tiny project with prepared digits, baseline, fleet, resilience trials and a plan."""
    return tiny_pipeline("fleet", SETUP, THROUGH_GROUP)


@pytest.fixture(scope="module")
def trained(planned: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of the planned project after one `fat` run (tests only read it)."""
    root = clone_project(planned, tmp_path_factory.mktemp("trained") / "project")
    run_stages(root, "fat")
    return root


def _enter(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    return project


@pytest.fixture
def in_planned(planned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clone of the planned project of this test's own, as the current folder."""
    return _enter(clone_project(planned, tmp_path / "project"), monkeypatch)


@pytest.fixture
def in_trained(trained: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The trained project as the current folder (read only)."""
    return _enter(trained, monkeypatch)


# Units one by one: the tests that count, interrupt or change `worker.train` per unit.
ONE_BY_ONE = ("--set", "execution.batch=1")


def _fat(project: Path, *extra: str) -> int:
    return main(["fat", "--params", str(project / "params.yaml"), *extra])


def _plan(project: Path) -> tuple[pd.DataFrame, str]:
    plan = pd.read_csv(project / "results/plan/plan.csv", dtype={"chip_id": str})
    run_id = json.loads((project / "results/plan/summary.json").read_text())["run_id"]
    return plan, run_id


def _versions(project: Path, chip_id: str) -> list:
    return find_model_versions(tracking_uri(project), names.registered_name(PREFIX, chip_id))


def _history(uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda h: h.step)


def _chips(project: Path) -> pd.DataFrame:
    return pd.read_csv(project / "results/fat/chips.csv", dtype={"chip_id": str,
                                                                 "model_version": str,
                                                                 "champion_version": str})


# --------------------------------------------------------------------------- the stage

def test_interrupted_fleet_is_killed_then_resumes(in_planned: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    in_project = in_planned
    plan, plan_id = _plan(in_project)
    feasible = plan.loc[plan["feasible"], "chip_id"].tolist()
    assert 2 <= len(feasible) < len(plan)        # the setup gives both kinds of chips
    real = worker.train
    calls: list[str] = []

    def interrupt_second(unit, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(unit.members[0].chip_id)
        if len(calls) == 2:                       # Ctrl-C while the 2nd chip trains
            raise KeyboardInterrupt
        return real(unit, *args, **kwargs)

    monkeypatch.setattr(worker, "train", interrupt_second)
    assert _fat(in_project, *ONE_BY_ONE) == 130
    uri = tracking_uri(in_project)
    (killed,) = find_runs(uri, {"reduce_ops.stage": "fat"}, statuses=("KILLED",))
    assert not (in_project / "results/fat/chips.csv").exists()       # nothing half-written
    # the first chip's model, trained before Ctrl-C, was still logged and registered
    assert [len(_versions(in_project, c)) for c in feasible] == [1] + [0] * (len(feasible) - 1)
    children = {r.tags["reduce_ops.chip_id"]: r.status
                for r in find_runs(uri, {"mlflow.parentRunId": killed.run_id})
                if "reduce_ops.rejected" not in r.tags}       # the plan's rejections come first
    assert children == {feasible[0]: "FINISHED"}

    calls.clear()
    monkeypatch.setattr(worker, "train", lambda unit, *a, **k: (
        calls.append(unit.members[0].chip_id), real(unit, *a, **k))[1])
    assert _fat(in_project, *ONE_BY_ONE) == 0
    assert calls == feasible[1:]                  # the chip done before Ctrl-C is not retrained
    assert all(len(_versions(in_project, c)) == 1 for c in feasible)
    chips = _chips(in_project).set_index("chip_id")
    assert not chips.loc[feasible[0], "trained"]
    assert chips.loc[feasible[1:], "trained"].all()


def test_every_chip_has_a_child_run_and_feasible_ones_a_registered_model(in_trained: Path) -> None:
    in_project = in_trained
    plan, plan_id = _plan(in_project)
    uri = tracking_uri(in_project)
    chips = _chips(in_project).set_index("chip_id")
    summary = json.loads((in_project / "results/fat/summary.json").read_text())
    children = {}
    for run in find_runs(uri, {"reduce_ops.plan_run_id": plan_id}, statuses=("FINISHED",)):
        if "mlflow.parentRunId" in run.tags:     # the chip runs, not the stage runs
            children.setdefault(run.tags["reduce_ops.chip_id"], []).append(run)
    for row in plan.itertuples():
        if not row.feasible:
            (run,) = children[row.chip_id]             # one rejection (chip not reached before)
            assert run.tags["reduce_ops.rejected"] == "true"
            assert run.params["reason"] and "test_accuracy" not in run.metrics
            assert _versions(in_project, row.chip_id) == []
            assert chips.loc[row.chip_id, "status"] == "rejected"
            continue
        (run,) = [r for r in children[row.chip_id] if "test_accuracy" in r.metrics]
        p, m = run.params, run.metrics
        assert p["chip_id"] == row.chip_id and p["plan_run_id"] == plan_id
        assert float(p["fault_rate"]) == row.fault_rate
        assert float(p["planned_epochs"]) == row.planned_epochs
        assert 0.0 < float(p["pruned_fraction"]) < 1.0
        assert m["constraint_met"] == float(m["test_accuracy"] >= summary["constraint_level"])
        assert m["train_seconds"] > 0 or row.planned_epochs == 0
        # verified on validation: shipped at the first check at level + margin, else the cap
        history = [(h.step / 1000, h.value) for h in _history(uri, run.run_id, "val_accuracy")]
        threshold = summary["decision_level"] + float(p["verify_margin"])
        assert history[0][0] == row.planned_epochs and m["n_checks"] == len(history)
        assert all(v < threshold for _, v in history[:-1])
        assert bool(m["verified"]) == (history[-1][1] >= threshold)
        assert m["actual_epochs"] == history[-1][0]
        assert m["verified"] or m["actual_epochs"] == summary["budget_cap"]
        (version,) = _versions(in_project, row.chip_id)
        tags = version.tags
        assert version.run_id == run.run_id
        assert tags["chip_id"] == row.chip_id and tags["plan_run_id"] == plan_id
        assert float(tags["test_accuracy"]) == m["test_accuracy"]
        assert tags["fault_rate"] == f"{row.fault_rate:.4f}"        # what people read
        assert float(tags["planned_epochs"]) == row.planned_epochs
        assert float(tags["actual_epochs"]) == m["actual_epochs"]
        assert float(tags["constraint_level"]) == summary["constraint_level"]
        assert (tags["constraint_met"] == "true") == bool(m["constraint_met"])
        assert (names.CHAMPION in version.aliases) == bool(m["verified"])  # only if verified
        assert chips.loc[row.chip_id, "model_version"] == version.version
        assert chips.loc[row.chip_id, "status"] == ("shipped" if m["verified"] else "rejected")
    n_planned = int(plan["feasible"].sum())
    assert summary["n_chips"] == len(plan) and summary["n_planned"] == n_planned
    assert summary["n_shipped"] == int((chips["status"] == "shipped").sum())
    assert summary["n_meet_on_test"] == int((chips["meets_on_test"]
                                             & (chips["status"] == "shipped")).sum())
    assert summary["total_planned_epochs"] == pytest.approx(plan["planned_epochs"].sum())
    assert summary["total_epochs"] == pytest.approx(chips["actual_epochs"].sum())


def test_fetched_model_matches_pt2_export_and_keeps_faulty_weights_zero(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    in_project = trained
    cfg = load_config(in_project / "params.yaml")
    data = load_prepared(cfg.path("prepared"))
    uri = f"sqlite:///{in_project / 'mlflow.db'}"        # the project's own store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # Any folder will do, given only the tracking URI: no params.yaml is read.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    chips = _chips(in_project)
    champions = chips.loc[chips["status"] == "shipped", "chip_id"].tolist()
    assert champions
    x = data.x["test"][:16]
    for chip_id in champions:
        model = reduce_ops.load_chip_model(chip_id)              # found by its chip_id tag
        registered = MlflowClient(uri).get_registered_model(f"{PREFIX}-{chip_id}")
        assert registered.tags["chip_id"] == chip_id             # shown on the models page
        rate = chips.set_index("chip_id").loc[chip_id, "fault_rate"]
        assert registered.tags["fault_rate"] == f"{rate:.4f}"     # 4 digits, as people read
        assert isinstance(model, torch.nn.Module) and not model.training
        assert all(p.requires_grad for p in model.parameters())  # trainable, not a graph
        exported = mlflow.pytorch.load_model(f"models:/{PREFIX}-{chip_id}@champion")
        raw = Preprocess.from_meta(data.meta).raw(x)          # what a client has: uint8 pixels
        assert raw.dtype == torch.uint8
        with torch.no_grad():
            torch.testing.assert_close(model(x), exported(raw))   # normalised inside
        assert "uint8" in registered.description
        acc, _ = evaluate(model, data.x["test"], data.y["test"])
        (version,) = _versions(in_project, chip_id)
        assert acc == float(version.tags["test_accuracy"])      # the model that was trained
        faulty = np.load(cfg.path("fleet") / f"{chip_id}.npy")
        params = dict(model.named_parameters())
        masks = build_masks(model, faulty, cfg.hardware.layer_types)
        assert masks and not all(bool(m.all()) for m in masks.values())
        for name, keep in masks.items():
            assert torch.count_nonzero(params[name].detach()[~keep]) == 0, name

    chip_id = champions[0]
    explicit = reduce_ops.load_chip_model(chip_id, tracking_uri=uri, prefix=PREFIX)
    out = tmp_path / "fetched"
    assert main(["fetch", chip_id, "--out", str(out),
                 "--params", str(in_project / "params.yaml")]) == 0
    assert (out / "model" / "MLmodel").is_file() and (out / "model/data/model.pt2").is_file()
    ckpt = torch.load(out / names.CHIP_MODEL_FILE, weights_only=True)
    for key, value in explicit.state_dict().items():
        assert torch.equal(ckpt["state_dict"][key], value)


def test_load_chip_model_needs_a_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="tracking_uri= or set MLFLOW_TRACKING_URI"):
        reduce_ops.load_chip_model("chip-000")


def test_rerun_registers_nothing_and_a_chip_rejected_later_loses_its_champion(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    in_project = _enter(clone_project(trained, tmp_path / "project"), monkeypatch)
    plan, _ = _plan(in_project)
    feasible = plan.loc[plan["feasible"], "chip_id"].tolist()
    before = {c: len(_versions(in_project, c)) for c in feasible}
    assert _fat(in_project) == 0
    assert {c: len(_versions(in_project, c)) for c in feasible} == before
    chips = _chips(in_project).set_index("chip_id")
    assert not chips.loc[feasible, "trained"].any()

    # --force retrains everything; the first chip now misses verification (an impossible
    # margin): it is rejected at the cap, and its champion of the earlier run is withdrawn.
    first = feasible[0]
    assert any(names.CHAMPION in v.aliases for v in _versions(in_project, first))
    real = worker.train

    def miss_first(unit, baseline, data, settings, *args):  # noqa: ANN001, ANN002
        if unit.members[0].chip_id == first:
            settings = dataclasses.replace(
                settings, rule=dataclasses.replace(settings.rule, margin=1.0))
        return real(unit, baseline, data, settings, *args)

    monkeypatch.setattr(worker, "train", miss_first)
    assert _fat(in_project, "--force", *ONE_BY_ONE) == 0
    after = {c: _versions(in_project, c) for c in feasible}
    assert {c: len(v) for c, v in after.items()} == {c: n + 1 for c, n in before.items()}
    assert not any(names.CHAMPION in v.aliases for v in after[first])
    assert after[first][0].tags["verified"] == "false"
    chips = _chips(in_project).set_index("chip_id")
    assert chips.loc[first, "status"] == "rejected"
    assert chips.loc[first, "actual_epochs"] == json.loads(
        (in_project / "results/plan/summary.json").read_text())["budget_cap"]
    # fetch says why there is no model for it now
    capsys.readouterr()
    assert main(["fetch", first, "--params", str(in_project / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rejected" in err[0] and "budget cap" in err[0]
    summary = json.loads((in_project / "results/fat/summary.json").read_text())
    assert first in summary["rejected"] and summary["n_trained"] == len(feasible)


def test_a_chip_the_plan_rejects_loses_an_older_champion(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new plan (here: a stricter constraint) that finds a chip infeasible takes the champion
    alias of the older plan's model away; fetch then says why."""
    in_project = _enter(clone_project(trained, tmp_path / "project"), monkeypatch)
    plan, _ = _plan(in_project)
    shipped = _chips(in_project).query("status == 'shipped'")["chip_id"].tolist()
    assert shipped
    params = str(in_project / "params.yaml")
    strict = ["--set", "constraint.value=0.999"]          # nothing reaches it
    assert main(["resilience", "--params", params, *strict]) == 0
    assert main(["plan", "--params", params, *strict]) == 0
    assert main(["group", "--params", params, *strict]) == 0
    assert main(["fat", "--params", params, *strict]) == 0
    for chip_id in shipped:
        assert not any(names.CHAMPION in v.aliases for v in _versions(in_project, chip_id))
        with pytest.raises(TrackingError, match="rejected"):
            registry.champion(tracking_uri(in_project), chip_id, PREFIX)


def test_unknown_chip_id_is_one_line_naming_close_matches(
        in_trained: Path, capsys: pytest.CaptureFixture) -> None:
    in_project = in_trained
    plan, _ = _plan(in_project)
    known = plan.loc[plan["feasible"], "chip_id"].iloc[0]      # e.g. chip-000
    typo = known.replace("-", "-0")                            # chip-0000
    capsys.readouterr()
    assert main(["fetch", typo, "--params", str(in_project / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert typo in err and known in err
    with pytest.raises(TrackingError, match=known):
        reduce_ops.load_chip_model(typo, tracking_uri=tracking_uri(in_project))


# --------------------------------------------------------------------------- pieces

def test_zero_planned_epochs_is_fault_aware_pruning_only(prepared_digits) -> None:
    """Planned 0 epochs: no training, only the chip's faulty weights become 0 (biases kept)."""
    torch.manual_seed(0)
    baseline = build_model("lenet", prepared_digits.input_shape, prepared_digits.num_classes)
    fault_map = uniform_fault_map(ArrayGeometry(16, 16), 0.3, seed=1, chip_id="c")
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml").fat
    out = fat_curve(baseline, fault_map, ("conv", "linear"), prepared_digits, [0.0], cfg)
    masks = out.session.masks
    base = dict(baseline.named_parameters())
    for name, param in out.session.model.named_parameters():
        expected = base[name] * masks[name] if name in masks else base[name]
        assert torch.equal(param, expected.detach()), name
    assert out.session.pruned_fraction == pytest.approx(0.3, abs=0.05)
    assert 0.0 <= out.at(0.0, "test_accuracy") <= 1.0
    assert not math.isnan(out.at(0.0, "val_accuracy"))


def test_stale_plan_is_a_clear_error() -> None:
    maps = [FaultMap("a", np.zeros((4, 4), bool)), FaultMap("b", np.ones((4, 4), bool))]
    chips = pd.DataFrame({"chip_id": ["a", "c"], "fault_rate": [0.0, 1.0], "needed": [0.0, 0.0],
                          "planned_epochs": [0.0, 0.0], "feasible": [True, True],
                          "reason": ["", ""]})
    rule = ShippingRule(0.9, 0.9, 0.0, 0.25, 1.0)
    plan = plan_record.Plan(chips, pd.DataFrame(),
                            plan_record.PlanSummary("p", "r", rule, "mean", "", "", {}))
    with pytest.raises(DataError, match="does not match the fleet.*chips not in the fleet: c"):
        plan_record.for_fleet(plan, maps, Path("plan.csv"))
    chips["chip_id"] = ["a", "b"]
    chips["fault_rate"] = [0.0, 0.5]
    with pytest.raises(DataError, match="chip 'b' planned at fault rate 0.5, its map has 1"):
        plan_record.for_fleet(plan, maps, Path("plan.csv"))


@pytest.mark.parametrize(("batch", "trainer", "after"), [(1, "train", 2),
                                                       (2, "train_batch", 1)])
def test_sigkill_mid_fleet_then_rerun_registers_each_chip_once(
        trained: Path, planned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        batch: int, trainer: str, after: int) -> None:
    """The driver is SIGKILLed right after its 2nd chip trained (one by one), or its first
    batch of two (the process logging the models dies with it): the rerun reaps the dead run,
    finishes what was registered, trains the rest, and every chip ends with exactly one
    version for the plan and the outcome of a run that was never killed."""
    from conftest import run_killed_after

    project = clone_project(planned, tmp_path / "project")
    proc = run_killed_after(project, ["fat", "--params", str(project / "params.yaml"),
                                      "--set", f"execution.batch={batch}"],
                            "reduce_ops.retraining.worker", trainer, after)
    assert proc.returncode == -9, proc.stderr
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(project)
    (dead,) = find_runs(uri, {"reduce_ops.stage": "fat"}, statuses=("RUNNING",))
    monkeypatch.chdir(project)
    assert _fat(project) == 0
    assert find_runs(uri, {"reduce_ops.stage": "fat"},
                              statuses=("KILLED",))[0].run_id == dead.run_id
    plan, plan_id = _plan(project)
    for chip in plan.loc[plan["feasible"], "chip_id"]:
        mine = [v for v in _versions(project, chip) if v.tags.get("plan_run_id") == plan_id]
        assert len(mine) == 1, (chip, mine)
        assert names.CHAMPION in mine[0].aliases or mine[0].tags["verified"] == "false"
    cols = ["chip_id", "status", "actual_epochs", "val_accuracy", "test_accuracy",
            "planned_epochs", "n_checks", "meets_on_test"]
    pd.testing.assert_frame_equal(_chips(project)[cols], _chips(trained)[cols])

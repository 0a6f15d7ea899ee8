"""Resilience stage: one MLflow child run per trial, CSVs that agree with MLflow, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_GRID, clone_project, run_killed_after

from reduce_ops import resilience
from reduce_ops.cli import main
from reduce_ops.config import load_config
from reduce_ops.records import trials as trials_record
from reduce_ops.tracking.runs import find_runs, read_children
from reduce_ops.tracking.store import tracking_uri

GRID = [*TINY_GRID, "resilience.fault_rates=[0.0, 0.3]", "resilience.accuracy_levels=[0.5, 0.9]",
        "compare.fixed_epochs=[0.25, 0.5]", "train.max_epochs=4",
        "group.enabled=false"]        # eFAT in compare: test_grouping.py


@pytest.fixture(scope="module")
def project(tiny_pipeline) -> Path:
    """A tiny project with prepared digits, a briefly trained baseline, a fleet and one finished
    resilience run; tests that add runs that change what later stages read work on a clone.
    (This module's alone: its plan and compare tests write their outputs into it.)"""
    return tiny_pipeline("res", GRID, ["prepare", "pretrain", "faultmaps", "resilience"])


def _run(project: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return main(["resilience", "--params", str(project / "params.yaml"), *extra])


def test_trials_logged_as_children_and_csv_agrees(project: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # the project's own mlflow.db
    cfg = load_config(project / "params.yaml")
    uri = tracking_uri(project)
    summary = json.loads((project / "results/resilience/summary.json").read_text())
    children = read_children(uri, summary["run_id"],
                             [*trials_record.TRIAL_METRICS, "retraining_epochs"])
    assert len(children) == 4
    keys = {(float(c["params"]["fault_rate"]), int(c["params"]["repetition"])) for c in children}
    assert keys == {(0.0, 0), (0.0, 1), (0.3, 0), (0.3, 1)}
    for c in children:
        p = c["params"]
        assert int(p["fault_seed"]) == resilience.trial_seed(cfg.resilience.seed,
                                                             float(p["fault_rate"]),
                                                             int(p["repetition"]))
        assert 0.0 <= float(p["pruned_fraction"]) <= 1.0
        # the grid, then (past it, up to the cap) the same run going on in checkpoint steps
        steps = [s for s, _ in c["histories"]["val_accuracy"]]
        assert steps == list(range(0, steps[-1] + 1, 250)) and 500 <= steps[-1] <= 1000
        assert (steps[-1] > 500) == (p["extended"] == "True")
        assert [v for _, v in c["histories"]["retraining_epochs"]] == [s / 1000 for s in steps]
        if float(p["fault_rate"]) == 0.0:
            assert int(p["n_faulty"]) == 0 and float(p["pruned_fraction"]) == 0.0
        else:
            assert int(p["n_faulty"]) == round(0.3 * 16 * 16)
    # The CSV holds exactly what MLflow holds.
    csv = pd.read_csv(project / "results/resilience/trials.csv")
    from_mlflow = trials_record.table([trials_record.from_run(c) for c in children])
    pd.testing.assert_frame_equal(csv, from_mlflow, check_dtype=False)
    # At fault rate 0, before any retraining, the model is the baseline (validation).
    base = summary["baseline_val_accuracy"]
    at_zero = csv[(csv.fault_rate == 0.0) & (csv.amount == 0.0)]["val_accuracy"]
    assert len(at_zero) == 2 and (at_zero == base).all()
    # The test split only reports: measured once per trial, on its final model.
    last = csv.groupby(["fault_rate", "repetition"])["amount"].transform("max") == csv["amount"]
    assert csv.loc[last, "test_accuracy"].between(0, 1).all()
    assert csv.loc[~last, "test_accuracy"].isna().all()
    # Decided on validation: the level comes from the baseline's validation accuracy.
    assert summary["decision_level"] == pytest.approx(
        summary["baseline_val_accuracy"] - cfg.constraint.value)
    res_map = pd.read_csv(project / "results/resilience/resilience_map.csv")
    bar = summary["decision_level"] + cfg.verify.margin      # what verification asks of a chip
    assert set(res_map["level"].round(6)) == {0.5, 0.9, round(summary["decision_level"], 6),
                                              round(bar, 6)}
    for name in ("accuracy_vs_fault_rate.png", "retraining_needed.png"):
        assert (project / "results/resilience" / name).read_bytes()[:4] == b"\x89PNG"


def test_interrupted_run_is_killed_and_resumed(project: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    project = clone_project(project, tmp_path / "clone")
    real = resilience.run_trial
    calls: list[str] = []

    def interrupt_after_two(*args, **kwargs):  # noqa: ANN002, ANN003
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[2].key)
        return real(*args, **kwargs)

    # A different seed makes a new grid, so nothing from the first test is reused; trials one
    # by one (execution.batch 1), so that the interruption falls between two of them.
    monkeypatch.setattr(resilience, "run_trial", interrupt_after_two)
    before = (project / "results/resilience/trials.csv").read_bytes()
    assert _run(project, monkeypatch, "--set", "resilience.seed=7",
                "--set", "execution.batch=1") == 130
    uri = tracking_uri(project)
    killed = find_runs(uri, {"reduce_ops.stage": "resilience"}, statuses=("KILLED",))
    assert len(killed) == 1
    assert len(read_children(uri, killed[0].run_id, ["val_accuracy"])) == 2
    # Nothing half-written: the previous outputs are untouched.
    assert (project / "results/resilience/trials.csv").read_bytes() == before

    calls.clear()
    monkeypatch.setattr(resilience, "run_trial", lambda *a, **k: (calls.append(a[2].key),
                                                                  real(*a, **k))[1])
    assert _run(project, monkeypatch, "--set", "resilience.seed=7",
                "--set", "execution.batch=1") == 0
    assert len(calls) == 2                                  # only the missing trials trained
    summary = json.loads((project / "results/resilience/summary.json").read_text())
    assert summary["n_reused"] == 2
    children = read_children(uri, summary["run_id"], ["val_accuracy"])
    assert len(children) == 4
    assert sum("reduce_ops.reused_from" in c["tags"] for c in children) == 2


def test_plan_from_mlflow_equals_plan_from_csv(project: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from reduce_ops.planning import make_plan

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["plan", "--params", str(project / "params.yaml")]) == 0
    cfg = load_config(project / "params.yaml")
    summary = json.loads((project / "results/plan/summary.json").read_text())
    res_summary = json.loads((project / "results/resilience/summary.json").read_text())
    assert summary["resilience_run_id"] == res_summary["run_id"]     # the run DVC tracked
    from_mlflow = pd.read_csv(project / "results/plan/plan.csv", keep_default_na=False,
                              na_values=[""])
    fleet = pd.read_csv(project / "data/fleet/fleet.csv")[["chip_id", "fault_rate"]]
    from_csv = make_plan(pd.read_csv(project / "results/resilience/trials.csv"), fleet,
                         summary["decision_level"], cfg.plan.statistic,
                         cfg.resilience.checkpoint_every, cfg.plan.safety_margin,
                         cfg.plan.budget_cap).plan
    cols = ["chip_id", "fault_rate", "needed", "planned_epochs", "feasible"]
    pd.testing.assert_frame_equal(from_mlflow[cols], from_csv[cols], check_dtype=False)
    assert len(from_mlflow) == cfg.faultmaps.n_chips
    assert (project / "results/plan/plan_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_without_resilience_run_says_what_to_run(project: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    # The autouse fixture points MLFLOW_TRACKING_URI at an empty store in tmp_path.
    assert main(["plan", "--params", str(project / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "summary.json: resilience run" in err and "run `reduce-ops resilience`" in err


def test_compare_arithmetic_and_reuse_is_honest(project: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from reduce_ops.data import load_prepared
    from reduce_ops.fault_aware import fault_aware_train
    from reduce_ops.hardware import ArrayGeometry, build_masks, load_fleet
    from reduce_ops.models import load_checkpoint
    from reduce_ops.training import evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # its own plan: another test of this module may have removed the one planned before
    assert main(["plan", "--params", str(project / "params.yaml")]) == 0
    assert main(["compare", "--params", str(project / "params.yaml")]) == 0
    out = project / "results/compare"
    per_chip = pd.read_csv(out / "per_chip.csv")
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=[""])
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = load_config(project / "params.yaml")
    n_chips = cfg.faultmaps.n_chips
    assert set(summary["policy"]) == {"fixed-0.25", "fixed-0.5", "fixed-0.25-unchecked",
                                      "fixed-0.5-unchecked", "fixed-1-unchecked", "reduce-max",
                                      "reduce-mean", "reduce-mean-flat0.75pt", "oracle"}
    level_val, level_test = metrics["decision_level"], metrics["constraint_level"]
    for row in summary.itertuples(index=False):
        rows = per_chip[per_chip["policy"] == row.policy]
        assert len(rows) == row.n_chips == n_chips
        assert row.n_shipped == int(rows["shipped"].sum())
        assert row.n_meet_on_test == int(rows["meets_on_test"].sum())
        assert row.total_epochs == pytest.approx(rows["epochs"].sum())
        assert metrics["policies"][row.policy]["n_shipped"] == row.n_shipped
        shipped = rows[rows["shipped"]]
        assert (shipped["meets_on_test"] == (shipped["test_accuracy"] >= level_test)).all()
        assert not rows.loc[~rows["shipped"], "meets_on_test"].any()
        if row.policy == "reduce-mean-flat0.75pt":      # the earlier rule, kept as a reference
            assert (shipped["val_accuracy"] >= level_val + 0.0075).all()
        elif row.policy.endswith("-unchecked"):         # ships every chip it trained
            assert row.n_shipped == n_chips
        elif row.policy != "oracle":   # every real policy ships on the validation check alone
            margin = cfg.verify.margin
            assert (shipped["val_accuracy"] >= level_val + margin).all()
    # the test floor's figures: recoverable = meets on test after the cap, unchecked
    recoverable = per_chip[per_chip["policy"] == "fixed-1-unchecked"].set_index("chip_id")[
        "meets_unchecked"]
    for row in summary.to_dict("records"):
        rows = per_chip[per_chip["policy"] == row["policy"]].set_index("chip_id")
        assert row["n_recoverable"] == int(recoverable.sum())
        assert row["n_escapes"] == int((rows["shipped"] & ~rows["meets_on_test"]).sum())
        assert row["n_overkill"] == int((recoverable & ~rows["shipped"]).sum())
    assert (out / "curves.csv").is_file() and (out / "operating_characteristic.png").is_file()
    fixed = per_chip[per_chip["policy"] == "fixed-0.5"]
    assert (fixed["epochs"] == 0.5).all()
    # verified Reduce: never fewer epochs than planned, never more than the cap
    reduce = per_chip[(per_chip["policy"] == "reduce-max") & per_chip["planned_epochs"].notna()]
    assert (reduce["epochs"] >= reduce["planned_epochs"]).all()
    assert (reduce["epochs"] <= cfg.plan.budget_cap).all()
    # the oracle is a lower bound: no policy ships a chip meeting the test level for less
    oracle = per_chip[per_chip["policy"] == "oracle"].set_index("chip_id")
    for name in ("fixed-0.25", "fixed-0.5", "reduce-max", "reduce-mean"):
        met = per_chip[(per_chip["policy"] == name) & per_chip["meets_on_test"]]
        for row in met.itertuples():
            assert oracle.loc[row.chip_id, "meets_on_test"]
            assert oracle.loc[row.chip_id, "epochs"] <= row.epochs
    # One run per chip gave every policy's accuracy: a separate 0.25-epoch run agrees exactly.
    data = load_prepared(project / "data/prepared")
    fmap = load_fleet(project / "data/fleet", ArrayGeometry(16, 16))[0]
    model, _ = load_checkpoint(project / "models/baseline.pt")
    torch.manual_seed(0)
    fault_aware_train(model, build_masks(model, fmap, cfg.hardware.layer_types), data, 0.25,
                      cfg.fat)
    separate = evaluate(model, data.x["test"], data.y["test"])[0]
    shared = per_chip[(per_chip.policy == "fixed-0.25") & (per_chip.chip_id == fmap.chip_id)]
    assert float(shared["test_accuracy"].iloc[0]) == separate


@pytest.mark.parametrize("which", ["unknown", "another stage", "another grid", "another fat"])
def test_plan_refuses_a_resilience_run_it_cannot_use(project: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture,
                                                     which: str) -> None:
    """A wrong plan.resilience_run, or trials measured with other parameters than the current
    ones: one line naming what differs, exit 2, nothing written."""
    project = clone_project(project, tmp_path / "clone")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(project)
    res_run = json.loads((project / "results/resilience/summary.json").read_text())["run_id"]
    extra, expected = {
        "unknown": (["plan.resilience_run=0123abcd"], "plan.resilience_run: resilience run "
                                                      "'0123abcd' is not in"),
        "another stage": ([f"plan.resilience_run={find_runs(uri, {'reduce_ops.stage': 'pretrain'})[0].run_id}"],
                          "is a pretrain run, not a resilience run"),
        "another grid": (["resilience.fault_rates=[0.0, 0.2]"],
                         "was measured with resilience.fault_rates=[0.0, 0.3] (now [0.0, 0.2])"),
        "another fat": (["fat.lr=0.05"], "was measured with fat.lr=0.003 (now 0.05)"),
    }[which]
    plan_dir = project / "results/plan"
    shutil.rmtree(plan_dir, ignore_errors=True)        # another test may have planned already
    capsys.readouterr()
    sets = [a for e in extra for a in ("--set", e)]
    assert main(["plan", "--params", str(project / "params.yaml"), *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    if which.startswith("another "):
        assert res_run in err[0] or which == "another stage"
    assert not plan_dir.exists()


def test_resume_after_sigkill_reuses_finished_trials_and_gives_the_same_outputs(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    project = clone_project(project, tmp_path / "clone")
    reference = (project / "results/resilience/trials.csv").read_bytes()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)   # the project's own mlflow.db
    uri = tracking_uri(project)
    client = MlflowClient(uri)
    # the driver SIGKILLs itself right after its second trial is logged: no handler runs, no
    # run is ended, and the moment does not depend on how fast this machine is
    proc = run_killed_after(project, ["resilience", "--params", str(project / "params.yaml")],
                            "reduce_ops.tracking.runs", "StageRun.child_run", 2)
    assert proc.returncode == -9, proc.stderr
    running = find_runs(uri, {"reduce_ops.stage": "resilience"}, statuses=("RUNNING",))
    assert len(running) == 1, running
    killed_id = running[0].run_id
    assert client.get_run(killed_id).info.status == "RUNNING"
    done_before = len(read_children(uri, killed_id, ["val_accuracy"]))

    assert _run(project, monkeypatch) == 0
    assert client.get_run(killed_id).info.status == "KILLED"   # ended by the rerun
    summary = json.loads((project / "results/resilience/summary.json").read_text())
    assert summary["n_reused"] >= done_before >= 1
    # the same outputs as a run that was never killed (same seeds, same machine)
    assert (project / "results/resilience/trials.csv").read_bytes() == reference

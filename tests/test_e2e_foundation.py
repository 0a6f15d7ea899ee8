"""The real entry points: `mlflow run . -e ... --env-manager local` and `dvc repro`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_PIPELINE, make_project

from reduce_ops.stages import PIPELINE

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'store.db'}"
    env.pop("MLFLOW_RUN_ID", None)
    return env


@pytest.mark.slow
def test_mlflow_run_pretrain_logs_params_and_metrics(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    make_project(project)
    env = _env(tmp_path)
    _run([str(BIN / "mlflow"), "run", str(project), "-e", "prepare", "--env-manager", "local",
          "--experiment-name", "e2e"], project, env)
    _run([str(BIN / "mlflow"), "run", str(project), "-e", "pretrain", "--env-manager", "local",
          "--experiment-name", "e2e", "-P", "overrides=train.max_epochs=3 train.patience=5"],
         project, env)

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], "tags.`reduce_ops.stage` = 'pretrain'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_epochs"] == "3"           # the override arrived
    assert run.data.params["data.source"] == "digits"
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert run.data.params["dataset_hash"] == meta["dataset_hash"]
    history = client.get_metric_history(run.info.run_id, "holdout_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.metrics["test_accuracy"] > 0.5
    metrics = json.loads((project / "results/pretrain/metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    assert (project / "models/baseline.pt").is_file()


STAGES = ["prepare", "faultmaps", "pretrain", "resilience", "plan", "fat", "compare"]


@pytest.mark.slow
def test_dvc_repro_runs_stages_then_is_cached(tmp_path: Path) -> None:
    project = tmp_path / "project"
    make_project(project, TINY_PIPELINE)
    env = _env(tmp_path)
    env.pop("MLFLOW_TRACKING_URI")                  # the project's own mlflow.db
    _run(["git", "init", "-q"], project, env)
    _run([str(BIN / "dvc"), "init", "-q"], project, env)
    out = _run([str(BIN / "dvc"), "repro"], project, env).stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, stage
    lock = (project / "dvc.lock").read_text()
    assert "data/prepared" in lock and "models/baseline.pt" in lock and "train:" in lock
    shown = json.loads(_run([str(BIN / "dvc"), "metrics", "show", "--json"], project,
                            env).stdout)
    text = json.dumps(shown)
    assert "test_accuracy" in text and "n_shipped" in text and "total_epochs" in text
    again = _run([str(BIN / "dvc"), "repro"], project, env).stdout
    # only `source` runs (it asks whether the model and data sources changed): they did not
    assert [line for line in again.splitlines() if "Running stage" in line] == [
        "Running stage 'source':"]
    # Changing only a plan parameter re-runs plan and what follows, nothing before it.
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("safety_margin: 1.0", "safety_margin: 1.5"))
    third = _run([str(BIN / "dvc"), "repro"], project, env).stdout
    ran = [s for s in STAGES if f"Running stage '{s}'" in third]
    assert ran == ["plan", "fat", "compare"]
    # A retrained baseline re-runs everything that depends on it, the plan included (fat
    # refuses a plan made for another baseline), even when the trials come out the same: with
    # 2 epochs the patience changes nothing but the checkpoint file (its MLflow run id).
    assert "patience: 3" in params.read_text()
    params.write_text(params.read_text().replace("patience: 3", "patience: 4"))
    fourth = _run([str(BIN / "dvc"), "repro"], project, env).stdout
    ran = [s for s in STAGES if f"Running stage '{s}'" in fourth]
    assert ran == ["pretrain", "resilience", "plan", "fat", "compare"]


@pytest.mark.slow
def test_mlflow_run_main_chains_every_step_under_one_parent(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    make_project(project, TINY_PIPELINE)
    env = _env(tmp_path)
    _run([str(BIN / "mlflow"), "run", str(project), "-e", "main", "--env-manager", "local",
          "--experiment-name", "pipeline"], project, env)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pipeline")
    parents = client.search_runs([exp.experiment_id], "tags.`reduce_ops.stage` = 'main'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    steps = client.search_runs([exp.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    # prepare and faultmaps log nothing to MLflow (DVC versions their outputs).
    assert sorted(r.data.tags["reduce_ops.stage"] for r in steps) == sorted(
        s for s in PIPELINE if s not in ("prepare", "faultmaps"))
    assert all(r.info.status == "FINISHED" for r in steps)
    # Per-chip runs sit beneath the fat step, not beneath (or instead of) the pipeline's run,
    # in the experiment of chip runs beside the pipeline's (whose first page shows the steps).
    fat = next(r for r in steps if r.data.tags["reduce_ops.stage"] == "fat")
    chips_exp = client.get_experiment_by_name("pipeline/chips")
    assert fat.data.tags["reduce_ops.children_experiment"] == chips_exp.experiment_id
    chips = client.search_runs([chips_exp.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{fat.info.run_id}'")
    assert len(chips) == 4
    assert (project / "results/compare/metrics.json").is_file()


@pytest.mark.slow
def test_imported_fleet_survives_dvc_repro_and_is_reimported_when_it_changes(
        tmp_path: Path) -> None:
    import numpy as np

    project = tmp_path / "project"
    params_file = make_project(project)
    params_file.write_text(params_file.read_text().replace("faultmaps:\n",
                                                           "faultmaps:   # our fleet\n"))
    env = _env(tmp_path)
    _run(["git", "init", "-q"], project, env)
    _run([str(BIN / "dvc"), "init", "-q"], project, env)
    floor = project / "floor"
    floor.mkdir()
    maps = {f"die-{i}": np.random.default_rng(i).random((16, 16)) < 0.1 * (i + 1)
            for i in range(3)}
    for chip_id, faulty in maps.items():
        np.save(floor / f"{chip_id}.npy", faulty)

    _run([str(BIN / "reduce-ops"), "faultmaps", "import", "floor"], project, env)
    params = (project / "params.yaml").read_text()
    assert "source: import" in params and "import_dir: floor" in params
    assert "faultmaps:   # our fleet" in params           # the file's comments are kept

    def fleet_ids() -> list[str]:
        lines = (project / "data/fleet/fleet.csv").read_text().splitlines()[1:]
        return sorted(line.split(",")[0] for line in lines)

    out = _run([str(BIN / "dvc"), "repro", "faultmaps"], project, env).stdout
    assert "Running stage 'faultmaps'" in out and "imported from floor" in out
    assert fleet_ids() == sorted(maps)                       # not a generated fleet
    assert "Running stage" not in _run([str(BIN / "dvc"), "repro", "faultmaps"], project,
                                       env).stdout
    # A re-tested die: repro sees the changed folder and imports it again.
    np.save(floor / "die-0.npy", np.ones((16, 16), dtype=bool))
    out = _run([str(BIN / "dvc"), "repro", "faultmaps"], project, env).stdout
    assert "Running stage 'faultmaps'" in out
    assert np.load(project / "data/fleet/die-0.npy").all()


@pytest.mark.slow
def test_ui_serves_the_store_and_prints_the_training_runs_page(tmp_path: Path) -> None:
    import socket
    import time
    import urllib.request

    project = tmp_path / "project"
    make_project(project)
    env = _env(tmp_path)
    env.pop("MLFLOW_TRACKING_URI")                  # the project's own mlflow.db
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(BIN / "reduce-ops"), "ui", "--port", str(port)], cwd=project,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments" in first
        assert "?workflowType=machine_learning" in first     # not MLflow's GenAI overview
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    assert r.read() == b"OK"
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

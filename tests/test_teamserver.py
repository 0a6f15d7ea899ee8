"""The team tracking server: a real PostgreSQL and `mlflow server` on loopback, a tiny pipeline
with 2 Ray workers against it, and a chip's model fetched by a second process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_PIPELINE, make_project

from reduce_ops import teamserver
from reduce_ops.errors import ReduceOpsError

PIPELINE = [*TINY_PIPELINE, "robustness.bers=[1.0e-3]", "robustness.repetitions=1",
            "execution.backend=ray", "execution.workers=2", "execution.torch_threads=1"]


@pytest.fixture
def server():
    try:
        teamserver.postgres_bin()
    except ReduceOpsError as exc:
        pytest.skip(f"PostgreSQL cannot run here: {exc}")
    # PostgreSQL runs as its own user when we are root: a folder it can reach, not tmp_path
    folder = Path(tempfile.mkdtemp(prefix="reduce-ops-server-"))
    folder.chmod(0o755)
    try:
        with teamserver.team_server(folder, teamserver.free_port(),
                                    teamserver.free_port()) as uri:
            yield uri
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_pipeline_on_ray_against_the_team_server_and_fetch_from_another_process(
        server: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    params = make_project(tmp_path / "project", PIPELINE)
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI")},
           "MLFLOW_TRACKING_URI": server}
    proc = subprocess.run([sys.executable, "-m", "reduce_ops", "main", "--params", str(params)],
                          cwd=params.parent, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    chips = pd.read_csv(params.parent / "results/fat/chips.csv")
    shipped = chips[chips.status == "shipped"].chip_id.tolist()
    assert shipped, "no chip shipped"
    client = MlflowClient(server, registry_uri=server)
    # one version per trained chip (no duplicates), none for a chip the plan rejected, trials
    # logged as children on the server (the search's answer listed whole in a failure)
    for chip, trained in zip(chips.chip_id, chips.trained):
        found = client.search_model_versions(f"name = 'reduce-ops-{chip}'")
        mine = [v for v in found if v.name == f"reduce-ops-{chip}"]
        assert len(mine) == int(bool(trained)), (chip, [(v.name, v.version, v.run_id)
                                                        for v in found])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`reduce_ops.trial` LIKE '%'")
    assert len(runs) == 4
    # A second process on the same server loads the champion through a models:/ URI.
    code = ("import mlflow, torch, sys; "
            f"m = mlflow.pytorch.load_model('models:/reduce-ops-{shipped[0]}@champion'); "
            "out = m(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)); "   # raw pixels in
            "sys.exit(0 if tuple(out.shape) == (2, 10) else 1)")
    fetched = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                             capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr[-2000:]

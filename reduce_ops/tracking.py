"""The only module that talks to MLflow: store location, stage runs, child runs, registry."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reduce_ops.errors import TrackingError

STAGE_TAG = "reduce_ops.stage"
MAX_PARAM_LEN = 6000


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set (a team's server); else SQLite at the project root (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def ensure_store(uri: str) -> None:
    """Create (migrate) an SQLite store once, before any parallel writer can race on it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    MlflowClient(uri).search_experiments(max_results=1)


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name)


def _param_str(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[:MAX_PARAM_LEN - 3] + "..."


@dataclass
class StageRun:
    """Handle on the stage's (parent) run; also counts the seconds spent in tracking calls."""

    run_id: str
    experiment_id: str
    uri: str
    client: Any
    tracking_seconds: float = 0.0

    @contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.tracking_seconds += time.perf_counter() - t0

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        with self._timed():
            items = [Param(k, _param_str(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        with self._timed():
            ts = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step)
                                                        for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        with self._timed():
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with self._timed():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        with self._timed():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def child_run(self, name: str, params: Mapping[str, Any],
                  metric_history: Mapping[str, Sequence[tuple[int, float]]],
                  tags: Mapping[str, Any] | None = None, status: str = "FINISHED") -> str:
        """One finished child run in one batch: params, metric histories (step, value), tags."""
        from mlflow.entities import Metric, Param, RunTag

        with self._timed():
            all_tags = {"mlflow.parentRunId": self.run_id, "mlflow.runName": name,
                        **{k: str(v) for k, v in (tags or {}).items()}}
            run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
            child_id = run.info.run_id
            ts = int(time.time() * 1000)
            metrics = [Metric(k, float(v), ts, int(step))
                       for k, hist in metric_history.items() for step, v in hist]
            params_l = [Param(k, _param_str(v)) for k, v in params.items()]
            for i in range(0, max(len(metrics), len(params_l), 1), 100):
                self.client.log_batch(child_id, metrics=metrics[i:i + 100],
                                      params=params_l[i:i + 100])
            self.client.set_terminated(child_id, status)
        return child_id


@contextmanager
def stage_run(root: Path, stage: str, experiment: str) -> Iterator[StageRun]:
    """The stage's MLflow run: the one `mlflow run` made (MLFLOW_RUN_ID) or a new one.

    Never calls set_experiment. On Ctrl-C the run is marked KILLED, on an error FAILED.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    try:
        ensure_store(uri)
    except Exception as exc:  # noqa: BLE001 - any store failure is one line for the user
        raise TrackingError(f"MLflow tracking store {uri}: cannot open ({exc})") from None
    client = MlflowClient(uri)
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        run = mlflow.start_run(run_id=env_run)
    else:
        run = mlflow.start_run(experiment_id=_experiment_id(client, experiment), run_name=stage)
    handle = StageRun(run.info.run_id, run.info.experiment_id, uri, client)
    handle.set_tags({STAGE_TAG: stage})
    try:
        yield handle
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def get_run(uri: str, run_id: str) -> Any:
    """Fetch a run by id, or a one-line TrackingError."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise TrackingError(f"MLflow run {run_id!r} not found in {uri}") from None

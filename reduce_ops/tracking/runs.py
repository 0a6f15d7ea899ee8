"""Stage runs and their child runs: logging params, metrics, tags, datasets, artifacts and
models; reading runs back."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reduce_ops import names
from reduce_ops.errors import TrackingError
from reduce_ops.tracking import layout
from reduce_ops.tracking.owner import driver_token, owner_gone
from reduce_ops.tracking.store import (
    all_experiment_ids,
    client_for,
    ensure_store,
    experiment_id_of,
    mark_model_training,
    param_text,
    tracking_uri,
)

DIGEST_LEN = 16           # MLflow's dataset digest column holds at most 36 characters
MLFLOW_DATASET_CONTEXT = "mlflow.data.context"   # input tag: what the dataset was used for


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as MLflow records a run's input: name, digest (content hash), source, profile."""

    name: str
    digest: str
    source: str
    profile: dict[str, Any]


class _RunLog:
    """Logging calls on one run (`run_id` via `client`), each timed by `_timed()`."""

    run_id: str
    client: Any

    def _timed(self) -> Any:  # a context manager adding to the stage's tracking_seconds
        raise NotImplementedError

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        with self._timed():
            items = [Param(k, param_text(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0,
                    when: float | None = None) -> None:
        """`when`: the time (time.time()) the values were measured, when not now."""
        from mlflow.entities import Metric

        with self._timed():
            ts = millis(when)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step)
                                                        for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        with self._timed():
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_numbers(self, summary: Mapping[str, Any]) -> None:
        """Log the finite numbers of a summary dict as metrics (bools, text, inf skipped)."""
        self.log_metrics({k: v for k, v in summary.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)
                          and math.isfinite(v)})

    def log_dataset(self, ref: DatasetRef, context: str = "training") -> None:
        """A dataset as the run's dataset input (the UI's Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=ref.name, digest=ref.digest[:DIGEST_LEN], source_type="local",
                          source=json.dumps({"uri": ref.source}),
                          profile=json.dumps(ref.profile))
        with self._timed():
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(
                dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with self._timed():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        """The files of a folder, but hidden ones (DVC's .gitignore, tools' markers)."""
        with self._timed():
            for file in sorted(Path(path).rglob("*")):
                rel = file.relative_to(path)
                if file.is_file() and not any(part.startswith(".") for part in rel.parts):
                    folder = "/".join(p for p in (artifact_path, rel.parent.as_posix())
                                      if p and p != ".")
                    self.client.log_artifact(self.run_id, str(file), folder or None)

    def describe(self, text: str) -> None:
        """The run's description (markdown, on its page in the UI)."""
        self.set_tags({layout.TAG_DESCRIPTION: layout.clip(text)})


@dataclass
class StageRun(_RunLog):
    """Handle on the stage's (parent) run; also counts the seconds spent in tracking calls."""

    run_id: str
    experiment_id: str
    uri: str
    client: Any
    tracking_seconds: float = 0.0
    children_experiment_id: str = ""     # where its child runs go ("" = its own experiment)
    head: str = ""                       # its description's first line: where its children are

    def describe(self, text: str) -> None:
        """The stage run's description (markdown, on its page): the line that links to its
        child runs, then `text`."""
        self.set_tags({layout.TAG_DESCRIPTION: layout.clip(
            "\n\n".join(part for part in (self.head, text) if part))})

    @property
    def children_experiment(self) -> str:
        return self.children_experiment_id or self.experiment_id

    def children_link(self) -> str:
        """The UI address of this run's child runs."""
        return layout.experiment_link(self.children_experiment, layout.parent_filter(self.run_id))

    def timed(self) -> Any:
        """A block whose seconds count as this stage's tracking time (MLflow work done
        outside the logging calls, e.g. a registry search)."""
        return self._timed()

    @contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.tracking_seconds += time.perf_counter() - t0

    def child_run(self, name: str, params: Mapping[str, Any],
                  metric_history: Mapping[str, Sequence[tuple]],
                  tags: Mapping[str, Any] | None = None, status: str = "FINISHED",
                  span: tuple[float, float] | None = None, description: str = "") -> str:
        """One finished child run in one batch: params, metric histories, tags. `span`: when
        the run's work started and ended (time.time()), when not now; a history's points are
        (step, value), measured at the span's end, or (step, value, time.time() measured)."""
        from mlflow.entities import Metric, Param

        start, end = span or (None, None)
        with self._timed():
            all_tags = {names.TAG_PARENT: self.run_id, names.TAG_RUN_NAME: name,
                        **{k: str(v) for k, v in (tags or {}).items()},
                        **({layout.TAG_DESCRIPTION: layout.clip(description)}
                           if description else {})}
            run = self.client.create_run(self.children_experiment, start_time=millis(start),
                                         tags=all_tags, run_name=name)
            child_id = run.info.run_id
            metrics = [Metric(k, float(point[1]),
                              millis(point[2] if len(point) > 2 else end), int(point[0]))
                       for k, hist in metric_history.items() for point in hist]
            params_l = [Param(k, param_text(v)) for k, v in params.items()]
            for i in range(0, max(len(metrics), len(params_l), 1), 100):
                self.client.log_batch(child_id, metrics=metrics[i:i + 100],
                                      params=params_l[i:i + 100])
            self.client.set_terminated(child_id, status, end_time=millis(end))
        return child_id


def millis(when: float | None) -> int:
    """time.time() seconds (None: now) as MLflow's milliseconds."""
    return int((time.time() if when is None else when) * 1000)


@contextmanager
def stage_run(root: Path, stage: str, experiment: str, dataset: DatasetRef | None = None,
              children: str = "") -> Iterator[StageRun]:
    """The stage's MLflow run: a child of an active run (`reduce-ops main`), the one
    `mlflow run` made (MLFLOW_RUN_ID), or a new one; `dataset` is logged as its input.
    `children` names the kind of its child runs (trials, chips...): they go to experiment
    `<its experiment>/<children>` (see layout), which its description links to.

    Never calls set_experiment. On Ctrl-C the run is marked KILLED, on an error FAILED.
    """
    import mlflow

    uri = tracking_uri(root)
    try:
        ensure_store(uri)
    except Exception as exc:  # noqa: BLE001 - any store failure is one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrackingError(f"MLflow tracking store {uri}: cannot open ({first})") from None
    client = client_for(uri)
    env_run = os.environ.get("MLFLOW_RUN_ID")
    active = mlflow.active_run()
    if active is not None:
        # A step of `reduce-ops main`: a child of the pipeline's run. Created explicitly, since
        # start_run() would resume MLFLOW_RUN_ID (the parent) when `mlflow run` set it.
        child = client.create_run(active.info.experiment_id, run_name=stage,
                                  tags={names.TAG_PARENT: active.info.run_id})
        run = mlflow.start_run(run_id=child.info.run_id, nested=True)
    elif env_run:
        run = mlflow.start_run(run_id=env_run)
        # Consumed: a later start_run(nested=True) must make a child, not resume this run.
        os.environ.pop("MLFLOW_RUN_ID", None)
    else:
        run = mlflow.start_run(experiment_id=experiment_id_of(client, experiment, uri),
                               run_name=stage)
    handle = StageRun(run.info.run_id, run.info.experiment_id, uri, client)
    with _ended_by_outcome():
        with handle._timed():
            mark_model_training(client, run.info.experiment_id)
        handle.set_tags({names.TAG_STAGE: stage, names.TAG_DRIVER: driver_token()})
        if children:
            with handle._timed():
                handle.children_experiment_id = layout.children_experiment(
                    client, uri, handle.experiment_id, children)
            handle.set_tags({names.TAG_CHILDREN_EXPERIMENT: handle.children_experiment_id})
            name = client.get_experiment(handle.children_experiment_id).name
            handle.head = (f"This run's {children} are runs of experiment **{name}**: "
                           f"[open them]({handle.children_link()}).")
            handle.describe("")
        if dataset is not None:
            handle.log_dataset(dataset)
        yield handle


@contextmanager
def _ended_by_outcome() -> Iterator[None]:
    """End the active run as FINISHED, KILLED (Ctrl-C) or FAILED (any error), then re-raise."""
    import mlflow

    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


@dataclass(frozen=True)
class RunRecord:
    """A run as plain data (no MLflow types leave this module)."""

    run_id: str
    experiment_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    deleted: bool = False          # in MLflow's trash (lifecycle stage "deleted")


def _record(run: Any) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.experiment_id, run.info.status,
                     dict(run.data.params), dict(run.data.metrics), dict(run.data.tags),
                     run.info.lifecycle_stage == "deleted")



def get_run(uri: str, run_id: str) -> RunRecord:
    """Fetch a run by id, or a one-line TrackingError."""
    from mlflow.exceptions import MlflowException

    try:
        return _record(client_for(uri).get_run(run_id))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise                   # the store failing is not a missing run (see store_failure)
        raise TrackingError(f"MLflow run {run_id!r} not found in {uri}") from None



def find_runs(uri: str, tags: Mapping[str, str], statuses: Sequence[str] | None = None,
              exclude: str | None = None) -> list[RunRecord]:
    """Runs in any experiment carrying all `tags`, newest first (optionally of given statuses)."""
    from mlflow.entities import ViewType

    client = client_for(uri)
    filters = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = client.search_runs(all_experiment_ids(client), " and ".join(filters),
                              run_view_type=ViewType.ACTIVE_ONLY,
                              order_by=["attributes.start_time DESC"], max_results=200)
    return [_record(r) for r in runs if (statuses is None or r.info.status in statuses)
            and r.info.run_id != exclude]


def read_children(uri: str, parent_run_id: str, metric_keys: Sequence[str],
                  statuses: Sequence[str] = ("FINISHED",)) -> list[dict[str, Any]]:
    """Child runs of a parent (in its children's experiment, or its own) as plain dicts:
    run_id, params, tags, histories {key: [(step, v)]}, times {key: [(step, time.time() it
    was measured)]} and span (start, end time.time())."""
    from mlflow.entities import ViewType

    client = client_for(uri)
    parent = get_run(uri, parent_run_id)
    where = list(dict.fromkeys([parent.tags.get(names.TAG_CHILDREN_EXPERIMENT) or
                                parent.experiment_id, parent.experiment_id]))
    children = client.search_runs(where, layout.parent_filter(parent_run_id),
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=50000)
    out = []
    for run in children:
        if run.info.status not in statuses:
            continue
        points = {k: sorted((m.step, m.value, m.timestamp / 1000) for m in
                            client.get_metric_history(run.info.run_id, k))
                  for k in metric_keys if k in run.data.metrics}
        out.append({"run_id": run.info.run_id, "params": dict(run.data.params),
                    "tags": dict(run.data.tags),
                    "histories": {k: [(s, v) for s, v, _ in p] for k, p in points.items()},
                    "times": {k: [(s, t) for s, _, t in p] for k, p in points.items()},
                    "span": (run.info.start_time / 1000,
                             (run.info.end_time or run.info.start_time) / 1000)})
    return out



def end_running_children(stage: StageRun, status: str = "KILLED") -> list[str]:
    """Child runs of `stage` still RUNNING (their process died: the logging process killed,
    out of memory) end `status`, so that none stays RUNNING forever. Returns their ids."""
    from mlflow.entities import ViewType

    client = stage.client
    where = list(dict.fromkeys([stage.children_experiment, stage.experiment_id]))
    with stage._timed():
        running = [r.info.run_id for r in client.search_runs(
            where, layout.parent_filter(stage.run_id),
            run_view_type=ViewType.ACTIVE_ONLY, max_results=50000)
            if r.info.status == "RUNNING"]
        for run_id in running:
            client.set_terminated(run_id, status)
    return running


def reap_abandoned(uri: str, tags: Mapping[str, str]) -> list[str]:
    """Runs with `tags` left RUNNING by a process that died without ending them (SIGKILL, out
    of memory, a power cut) are ended KILLED, with their RUNNING children, so that a rerun
    reuses their finished work like that of an interrupted run. Returns their run ids."""

    client = client_for(uri)
    reaped = []
    for run in find_runs(uri, tags, statuses=("RUNNING",)):
        if not owner_gone(run.tags.get(names.TAG_DRIVER, "")):
            continue
        for child in client.search_runs(all_experiment_ids(client),
                                        f"tags.`{names.TAG_PARENT}` = '{run.run_id}'",
                                        max_results=50000):      # a fleet's chips, not 1,000
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, "KILLED")
        client.set_terminated(run.run_id, "KILLED")
        reaped.append(run.run_id)
    return reaped


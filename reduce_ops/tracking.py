"""The only module that talks to MLflow: store location, stage runs, child runs, registry."""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reduce_ops import names
from reduce_ops.errors import TrackingError

MAX_PARAM_LEN = 6000
DIGEST_LEN = 16           # MLflow's dataset digest column holds at most 36 characters
MLFLOW_DATASET_CONTEXT = "mlflow.data.context"   # input tag: what the dataset was used for


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set (a team's server); else SQLite at the project root (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def ensure_store(uri: str) -> None:
    """Create (migrate) an SQLite store once, before any parallel writer can race on it."""
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store: noise in a stage's log
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    MlflowClient(uri).search_experiments(max_results=1)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """Id of the named experiment, created if missing; with an SQLite store its artifacts go
    to `mlruns/` beside the database file (not the current folder's, MLflow's default)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={names.TAG_EXPERIMENT_KIND: names.EXPERIMENT_KIND})
    except MlflowException as exc:
        # another pipeline on the same server created it between our lookup and create
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _mark_model_training(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model training, so the UI opens on its runs (not GenAI traces);
    covers experiments made by `mlflow run --experiment-name` or MLflow's Default."""
    exp = client.get_experiment(experiment_id)
    if (exp.tags or {}).get(names.TAG_EXPERIMENT_KIND) != names.EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, names.TAG_EXPERIMENT_KIND,
                                  names.EXPERIMENT_KIND)


def param_text(value: Any) -> str:
    """A parameter's value as MLflow stores it (text, shortened past MAX_PARAM_LEN)."""
    text = str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[:MAX_PARAM_LEN - 3] + "..."


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
        with self._timed():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)


@dataclass
class StageRun(_RunLog):
    """Handle on the stage's (parent) run; also counts the seconds spent in tracking calls."""

    run_id: str
    experiment_id: str
    uri: str
    client: Any
    tracking_seconds: float = 0.0

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
                  metric_history: Mapping[str, Sequence[tuple[int, float]]],
                  tags: Mapping[str, Any] | None = None, status: str = "FINISHED") -> str:
        """One finished child run in one batch: params, metric histories (step, value), tags."""
        from mlflow.entities import Metric, Param

        with self._timed():
            all_tags = {names.TAG_PARENT: self.run_id, names.TAG_RUN_NAME: name,
                        **{k: str(v) for k, v in (tags or {}).items()}}
            run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
            child_id = run.info.run_id
            ts = int(time.time() * 1000)
            metrics = [Metric(k, float(v), ts, int(step))
                       for k, hist in metric_history.items() for step, v in hist]
            params_l = [Param(k, param_text(v)) for k, v in params.items()]
            for i in range(0, max(len(metrics), len(params_l), 1), 100):
                self.client.log_batch(child_id, metrics=metrics[i:i + 100],
                                      params=params_l[i:i + 100])
            self.client.set_terminated(child_id, status)
        return child_id


_WORKER_STAGE: StageRun | None = None      # in a BackgroundTracking process: its stage run
_WORKER_FAILED = False


def _die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when the process that started it (pid `parent`) dies,
    so a logger never outlives a driver that was SIGKILLed (it would race the rerun's
    registrations, or wait on its queue forever). A driver that died before this ran (while
    the process was starting) is no longer its parent: then it ends at once."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _worker_init(uri: str, run_id: str, experiment_id: str, parent: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the driver's to handle
    _die_with_parent(parent)                         # before the slow imports below
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    torch.set_num_threads(1)          # exporting models: leave the other cores to training
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    global _WORKER_STAGE
    _WORKER_STAGE = StageRun(run_id, experiment_id, uri, MlflowClient(uri, registry_uri=uri))


def _in_worker(fn: Any, *args: Any) -> tuple[Any, float]:
    """Run fn(stage, *args) in the logger process; returns its result and its tracking time.
    After a job failed, the jobs queued behind it do nothing."""
    global _WORKER_FAILED
    stage = _WORKER_STAGE
    if _WORKER_FAILED or stage is None:
        return None, 0.0
    before = stage.tracking_seconds
    try:
        result = fn(stage, *args)
    except BaseException:
        _WORKER_FAILED = True
        raise
    return result, stage.tracking_seconds - before


class BackgroundTracking:
    """A stage's MLflow work in one separate process, in the order it is handed over, so that
    logging and registering a unit's model overlaps the training of the next ones (a thread
    would not: training small models holds the GIL most of the time).

    `submit(fn, *args)` queues `fn(stage, *args)`, where `fn` is a module-level function and
    `stage` the same stage run opened in that process. The driver waits only while `depth`
    jobs are queued (their models are held until logged) and at the end; `blocked_seconds` is
    that wait, the tracking time left on the critical path. A job that fails stops the jobs
    after it and its error is raised in the driver. On close the queued jobs still run (their
    models are trained: nothing is thrown away on Ctrl-C); the process ignores Ctrl-C and dies
    with the driver.
    """

    def __init__(self, stage: StageRun, depth: int = 8) -> None:
        self.stage, self.depth = stage, depth
        self.blocked_seconds = 0.0
        self.worker_seconds = 0.0         # MLflow time spent in the logger process
        self._pending: list[Any] = []
        self._heavy: list[Any] = []
        self._lock = threading.Lock()
        self._pool: Any = None

    def start(self) -> BackgroundTracking:
        """Start the process now (importing MLflow and torch takes seconds), so that it is
        ready when the first model is."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                initargs=(self.stage.uri, self.stage.run_id, self.stage.experiment_id, os.getpid()))
            self._pool.submit(int)                  # the pool spawns its process on a submit
        return self

    def submit(self, fn: Any, *args: Any, holds_model: bool = True) -> Any:
        """Queue fn(stage, *args); returns a future whose result() is fn's result. Only jobs
        that hold a model count towards `depth` (a job that logs a few numbers never waits)."""
        self._wait(lambda: sum(not f.done() for f in self._heavy) >= self.depth)
        self.start()
        future = self._pool.submit(_in_worker, fn, *args)
        future.add_done_callback(self._count)
        self._pending.append(future)
        if holds_model:
            self._heavy.append(future)
        return _Unwrapped(future)

    def _count(self, future: Any) -> None:
        if not future.cancelled() and future.exception() is None:
            with self._lock:
                self.worker_seconds += future.result()[1]

    def _wait(self, busy: Any) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        t0 = time.perf_counter()
        while busy():
            wait([f for f in self._pending if not f.done()], return_when=FIRST_COMPLETED)
        self.blocked_seconds += time.perf_counter() - t0
        for f in self._pending:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()

    def drain(self) -> None:
        """Wait for every queued job; raise the first error."""
        self._wait(lambda: any(not f.done() for f in self._pending))

    def close(self) -> None:
        """Finish the queued jobs and stop the process."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@dataclass(frozen=True)
class _Unwrapped:
    """A BackgroundTracking job's future, whose result is the job's own."""

    future: Any

    def result(self) -> Any:
        return self.future.result()[0]


@contextmanager
def stage_run(root: Path, stage: str, experiment: str,
              dataset: DatasetRef | None = None) -> Iterator[StageRun]:
    """The stage's MLflow run: a child of an active run (`reduce-ops main`), the one
    `mlflow run` made (MLFLOW_RUN_ID), or a new one; `dataset` is logged as its input.

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
        run = mlflow.start_run(experiment_id=_experiment_id(client, experiment, uri),
                               run_name=stage)
    handle = StageRun(run.info.run_id, run.info.experiment_id, uri, client)
    with _ended_by_outcome():
        with handle._timed():
            _mark_model_training(client, run.info.experiment_id)
        handle.set_tags({names.TAG_STAGE: stage, names.TAG_DRIVER: driver_token()})
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


def _record(run: Any) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.experiment_id, run.info.status,
                     dict(run.data.params), dict(run.data.metrics), dict(run.data.tags))


def experiment_page(base_url: str, uri: str, experiment: str) -> str:
    """The UI address of an experiment's training runs. MLflow 3's UI opens on its GenAI view
    unless told otherwise (a global switch, remembered by the browser), hence workflowType."""
    from mlflow.tracking import MlflowClient

    ensure_store(uri)
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    where = f"experiments/{exp.experiment_id}" if exp is not None else "experiments"
    return f"{base_url.rstrip('/')}/#/{where}?workflowType=machine_learning"


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` serving a local store (for a tracking server, open its address instead)."""
    import sys

    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
            "--port", str(port), "--workers", "1"]      # one browser needs no more


def get_run(uri: str, run_id: str) -> RunRecord:
    """Fetch a run by id, or a one-line TrackingError."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return _record(MlflowClient(uri).get_run(run_id))
    except MlflowException:
        raise TrackingError(f"MLflow run {run_id!r} not found in {uri}") from None


def _all_experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(max_results=1000)]


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" when unknown; with the
    pid it tells a live owner from a new process that reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def driver_token(pid: int | None = None) -> str:
    """host:pid:start of this (or another) process, tagged on every stage run."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _owner_gone(token: str) -> bool:
    """True when the process that tagged a run `token` is known to be dead: it ran on this
    host and no process with its pid and start time exists. Runs of other hosts are never
    judged (their owner may be alive)."""
    host, _, rest = token.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(ticks) and _start_ticks(pid) != ticks


def reap_abandoned(uri: str, tags: Mapping[str, str]) -> list[str]:
    """Runs with `tags` left RUNNING by a process that died without ending them (SIGKILL, out
    of memory, a power cut) are ended KILLED, with their RUNNING children, so that a rerun
    reuses their finished work like that of an interrupted run. Returns their run ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    reaped = []
    for run in find_runs(uri, tags, statuses=("RUNNING",)):
        if not _owner_gone(run.tags.get(names.TAG_DRIVER, "")):
            continue
        for child in client.search_runs(_all_experiment_ids(client),
                                        f"tags.`{names.TAG_PARENT}` = '{run.run_id}'",
                                        max_results=50000):      # a fleet's chips, not 1,000
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, "KILLED")
        client.set_terminated(run.run_id, "KILLED")
        reaped.append(run.run_id)
    return reaped


def find_runs(uri: str, tags: Mapping[str, str], statuses: Sequence[str] | None = None,
              exclude: str | None = None) -> list[RunRecord]:
    """Runs in any experiment carrying all `tags`, newest first (optionally of given statuses)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    filters = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = client.search_runs(_all_experiment_ids(client), " and ".join(filters),
                              run_view_type=ViewType.ACTIVE_ONLY,
                              order_by=["attributes.start_time DESC"], max_results=200)
    return [_record(r) for r in runs if (statuses is None or r.info.status in statuses)
            and r.info.run_id != exclude]


def read_children(uri: str, parent_run_id: str, metric_keys: Sequence[str],
                  statuses: Sequence[str] = ("FINISHED",)) -> list[dict[str, Any]]:
    """Child runs of a parent as plain dicts: run_id, params, tags, histories {key: [(step, v)]}."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = get_run(uri, parent_run_id)
    children = client.search_runs([parent.experiment_id],
                                  f"tags.`{names.TAG_PARENT}` = '{parent_run_id}'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=50000)
    out = []
    for run in children:
        if run.info.status not in statuses:
            continue
        histories = {k: sorted((m.step, m.value) for m in
                               client.get_metric_history(run.info.run_id, k))
                     for k in metric_keys if k in run.data.metrics}
        out.append({"run_id": run.info.run_id, "params": dict(run.data.params),
                    "tags": dict(run.data.tags), "histories": histories})
    return out


# --------------------------------------------------------------------------- models + registry

@dataclass(frozen=True)
class LoggedModel:
    """A model logged in a run: its URI, MLflow's model id and the format it was saved in."""

    model_uri: str
    model_id: str | None
    serialization_format: str      # "pt2" (torch.export) or "pickle" (the fallback)
    fallback_reason: str = ""      # why pt2 export failed, when it did
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version as plain data (no mlflow types outside this module)."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str]
    aliases: tuple[str, ...]


def _version_info(mv: Any) -> ModelVersionInfo:
    return ModelVersionInfo(mv.name, str(mv.version), mv.run_id or "", mv.source or "",
                            dict(mv.tags or {}), tuple(mv.aliases or ()))


@dataclass
class ModelChildRun(_RunLog):
    """A child run kept open (as MLflow's active run) while its metrics and model are logged;
    its tracking time counts towards the stage's."""

    run_id: str
    stage: StageRun

    @property
    def client(self) -> Any:
        return self.stage.client

    def _timed(self) -> Any:
        return self.stage._timed()

    def log_pytorch_model(self, model: Any, input_example: Any, pip_requirements: Sequence[str],
                          name: str = "model") -> LoggedModel:
        """mlflow.pytorch.log_model in the pt2 (torch.export) format; pickle if export fails.

        pt2 needs `input_example` (it traces forward on it); explicit `pip_requirements` skip
        MLflow's slow requirement inference. A pt2 model loads back as a GraphModule.
        """
        import mlflow.pytorch

        t0 = time.perf_counter()
        fallback = ""
        with self.stage._timed():
            try:
                info = mlflow.pytorch.log_model(model, name=name, input_example=input_example,
                                                pip_requirements=list(pip_requirements),
                                                serialization_format="pt2")
                fmt = "pt2"
            except Exception as exc:  # noqa: BLE001 - any export failure: fall back, say why
                fallback = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                info = mlflow.pytorch.log_model(model, name=name, input_example=input_example,
                                                pip_requirements=list(pip_requirements),
                                                serialization_format="pickle")
                fmt = "pickle"
        return LoggedModel(info.model_uri, getattr(info, "model_id", None), fmt, fallback,
                           time.perf_counter() - t0)


@contextmanager
def model_child_run(stage: StageRun, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, Any] | None = None) -> Iterator[ModelChildRun]:
    """A child run of `stage` that stays open (nested active run) while a model is logged.

    Ends FINISHED, or KILLED on Ctrl-C / FAILED on an error, before the exception reaches
    stage_run, so that stage_run's end_run marks the parent and not this child.
    """
    import mlflow

    with stage._timed():
        run = mlflow.start_run(experiment_id=stage.experiment_id, run_name=name, nested=True,
                               tags={names.TAG_PARENT: stage.run_id,
                                     **{k: str(v) for k, v in (tags or {}).items()}})
    child = ModelChildRun(run.info.run_id, stage)
    with _ended_by_outcome():
        if params:
            child.log_params(params)
        yield child


def register_model_version(stage: StageRun, name: str, logged: LoggedModel, run_id: str,
                           tags: Mapping[str, Any], alias: str | None = None,
                           model_tags: Mapping[str, Any] | None = None,
                           description: str = "") -> str:
    """Register a logged model as a new version of `name` (created if new, with `model_tags` and
    `description` on the registered model itself, which the UI's models page shows), version
    tags set in the same call; `alias` (e.g. champion) then moves to it. Returns the version."""
    from mlflow.exceptions import MlflowException

    client = stage.client
    model_tags = {k: str(v) for k, v in (model_tags or {}).items()}
    with stage._timed():
        try:
            client.create_registered_model(name, tags=model_tags, description=description)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            for key, value in model_tags.items():
                client.set_registered_model_tag(name, key, value)
        mv = client.create_model_version(name, logged.model_uri, run_id=run_id,
                                         tags={k: str(v) for k, v in tags.items()},
                                         model_id=logged.model_id)
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def set_alias(stage: StageRun, name: str, alias: str, version: str) -> None:
    """Point `alias` of registered model `name` at `version`."""
    with stage._timed():
        stage.client.set_registered_model_alias(name, alias, version)


def withdraw_alias(stage: StageRun, name: str, alias: str,
                   model_tags: Mapping[str, Any]) -> None:
    """Remove `alias` from registered model `name` (if it has it) and set `model_tags` on it;
    nothing when the model was never registered."""
    from mlflow.exceptions import MlflowException

    client = stage.client
    with stage._timed():
        try:
            model = client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return
            raise
        if alias in (model.aliases or {}):
            client.delete_registered_model_alias(name, alias)
        for key, value in model_tags.items():
            client.set_registered_model_tag(name, key, str(value))


def model_version_by_alias(uri: str, name: str, alias: str) -> ModelVersionInfo | None:
    """The version of `name` that carries `alias`; None when the model or the alias is missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return _version_info(MlflowClient(uri, registry_uri=uri)
                             .get_model_version_by_alias(name, alias))
    except MlflowException:
        return None


def find_model_versions(uri: str, name: str,
                        tags: Mapping[str, str] | None = None) -> list[ModelVersionInfo]:
    """Versions of registered model `name` carrying all `tags`, newest first ([] if unknown)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    filters = [f"name = '{name}'", *(f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items())]
    found = client.search_model_versions(" and ".join(filters))
    return _with_aliases(client, name, list(map(_version_info, found))) if found else []


def _with_aliases(client: Any, name: str,
                  versions: Sequence[ModelVersionInfo]) -> list[ModelVersionInfo]:
    """Versions of `name` with their aliases, newest first: search results carry no aliases,
    the registered model has them ({alias: version})."""
    from dataclasses import replace

    by_version: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    out = [replace(v, aliases=tuple(sorted(by_version.get(v.version, ())))) for v in versions]
    return sorted(out, key=lambda v: -int(v.version))


def model_versions_with_tag(uri: str, key: str, value: str) -> dict[str, list[ModelVersionInfo]]:
    """{registered model name: its versions carrying tag key=value, newest first, each with its
    aliases}, for every model in the registry: one paged search instead of one per model."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    found: dict[str, list[ModelVersionInfo]] = {}
    token = None
    while True:
        page = client.search_model_versions(f"tags.`{key}` = '{value}'", max_results=1000,
                                            page_token=token)
        for info in map(_version_info, page):
            found.setdefault(info.name, []).append(info)
        token = page.token
        if not token:
            break
    return {name: _with_aliases(client, name, versions) for name, versions in found.items()}


def registered_model_tags_of(uri: str, name: str) -> dict[str, str]:
    """The tags of registered model `name` ({} when it does not exist)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return dict(MlflowClient(uri, registry_uri=uri).get_registered_model(name).tags or {})
    except MlflowException:
        return {}


def registered_model_tags(uri: str, key: str) -> dict[str, str]:
    """{registered model name: value of its tag `key`} for every model carrying that tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    found: dict[str, str] = {}
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        found.update({m.name: m.tags[key] for m in page if key in (m.tags or {})})
        token = page.token
        if not token:
            return found


def download_model_version(uri: str, version: ModelVersionInfo, artifact: str,
                           dst: Path) -> tuple[Path, Path]:
    """Download a version's model directory (to dst/model) and one artifact of its run (to dst).

    Returns (model directory, artifact path).
    """
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    dst.mkdir(parents=True, exist_ok=True)
    model_dir = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{version.name}/{version.version}",
        dst_path=str(dst / "model"), tracking_uri=uri, registry_uri=uri))
    extra = Path(MlflowClient(uri).download_artifacts(version.run_id, artifact, str(dst)))
    return model_dir, extra


def download_run_artifact(uri: str, run_id: str, artifact: str, dst: Path) -> Path:
    """One artifact of a run, downloaded into the folder dst."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient(uri).download_artifacts(run_id, artifact, str(dst)))
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"run {run_id}: cannot download {artifact!r} from {uri} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                            ) from None

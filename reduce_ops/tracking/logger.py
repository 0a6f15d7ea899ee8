"""A stage's MLflow work in one separate process, so that logging and registering models
overlaps training."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from reduce_ops.processes import die_with_starter
from reduce_ops.tracking.runs import StageRun

_WORKER_STAGE: StageRun | None = None      # in a BackgroundTracking process: its stage run
_WORKER_FAILED = False


def _worker_init(uri: str, run_id: str, experiment_id: str, parent: int,
                 children_experiment_id: str = "", method: str = "spawn") -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the driver's to handle
    die_with_starter(parent, method)                 # before the slow imports below
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    torch.set_num_threads(1)          # exporting models: leave the other cores to training
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    global _WORKER_STAGE
    _WORKER_STAGE = StageRun(run_id, experiment_id, uri, MlflowClient(uri, registry_uri=uri),
                             children_experiment_id=children_experiment_id)


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
        """Start the process now (importing MLflow, and torch where it is spawned, takes
        seconds), so that it is ready when the first model is."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from reduce_ops.execution import helper_start_method

        if self._pool is None:
            method = helper_start_method()
            self._pool = ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context(method), initializer=_worker_init,
                initargs=(self.stage.uri, self.stage.run_id, self.stage.experiment_id, os.getpid(),
                          getattr(self.stage, "children_experiment_id", ""), method))
            self._pool.submit(int)                  # the pool spawns its process on a submit
        return self

    def submit(self, fn: Any, *args: Any, holds_model: bool = True) -> Any:
        """Queue fn(stage, *args); returns a future whose result() is fn's result. Only jobs
        that hold a model count towards `depth` (a job that logs a few numbers never waits)."""
        from concurrent.futures.process import BrokenProcessPool

        self._wait(lambda: sum(not f.done() for f in self._heavy) >= self.depth)
        self.start()
        try:
            future = self._pool.submit(_in_worker, fn, *args)
        except BrokenProcessPool:
            raise self._died() from None
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
        from concurrent.futures.process import BrokenProcessPool

        for f in self._pending:
            if f.done() and not f.cancelled() and f.exception() is not None:
                if isinstance(f.exception(), BrokenProcessPool):
                    raise self._died() from None
                raise f.exception()

    def _died(self) -> Exception:
        """The error for a logging process that died (killed, out of memory): the child runs
        it had open end KILLED (not RUNNING forever); what it registered is kept, and a rerun
        resumes from there."""
        from reduce_ops.errors import TrackingError
        from reduce_ops.tracking.runs import end_running_children

        pool, self._pool = self._pool, None      # broken: nothing more runs in it
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        ended = end_running_children(self.stage)
        return TrackingError(f"the process that logs and registers the models died (killed, "
                             f"or out of memory); {len(ended)} open run(s) of it ended KILLED, "
                             f"what it registered is kept: run the stage again to resume")

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


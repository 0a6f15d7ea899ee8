"""Where independent units of work run: on this machine (`local`: one after another in this
process with one worker, else a pool of `workers` processes at one torch thread each, forked
from a fork server that imported torch and the units' modules once per stage), or as Ray tasks
(`ray`) on a local Ray instance or a cluster.

Workers only compute: they get their inputs, return plain results, and never touch MLflow; the
driver logs each result as it arrives (explicit run ids, the same parent/child structure as
one worker). A unit whose worker dies (killed, out of memory, a lost node) runs again, in a
fresh pool or by Ray, at most RETRIES times; then the stage ends in one line.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from reduce_ops.config import ExecutionConfig
from reduce_ops.errors import ConfigError, ReduceOpsError

LOCAL = ExecutionConfig("local", None, 1, 0)   # in this process, torch's default threads
RETRIES = 3                       # a task whose worker died runs again, at most this often
OBJECT_STORE_BYTES = 200 * 2**20  # local instance: Ray's default is 30% of the machine's memory


class WorkerDiedError(ReduceOpsError):
    """A pool worker died (killed, out of memory) more often than RETRIES allows."""

    exit_code = 1


def pooled(exe: ExecutionConfig) -> bool:
    """Units run in worker processes (Ray, or a local pool of more than one worker), not in
    this one: they get one torch thread each unless execution.torch_threads says otherwise,
    and report nothing from inside a unit."""
    return exe.backend == "ray" or exe.workers > 1


def parallel(exe: ExecutionConfig) -> int:
    """How many units run at once: execution.workers where they run in worker processes."""
    return exe.workers if pooled(exe) else 1


def worker_threads(exe: ExecutionConfig) -> int:
    """torch threads of each worker process (0 = torch's default, in this process only)."""
    return exe.torch_threads if exe.torch_threads or not pooled(exe) else 1


@contextmanager
def _without_run_id() -> Iterator[None]:
    """Worker processes started in the block do not inherit the driver's MLflow run (they
    never log); the driver's environment is as before afterwards."""
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


def set_torch_threads(threads: int) -> None:
    """torch's intra-op threads for this process (0 leaves torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameters


@functools.cache
def keep_freed_memory() -> None:
    """Training's freed buffers stay in this process for the next step (glibc): blocks up to
    32 MiB come from the heap, and the heap is not handed back to the system while under
    1 GiB is free at its top. By default each step's large activations and gradients were
    mapped fresh and faulted in page by page: LeNet, 8 chips batched, one thread, 12,600 ->
    15,600 chip-images/s on this project's machine. Memory stays at its peak instead of
    shrinking between steps. Nothing to do where the C library is not glibc. Once per process
    (a Ray worker calls it with every task)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)     # glibc's largest
    mallopt(_M_TRIM_THRESHOLD, 2**30)


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def check_address(exe: ExecutionConfig, timeout: float = 3.0) -> None:
    """Fail in one line naming execution.address when a Ray cluster it names cannot be reached,
    before any work starts."""
    if exe.backend != "ray" or exe.address is None:
        return
    address = exe.address
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address:
            from ray._private.services import find_gcs_addresses  # what ray.init("auto") reads

            found = find_gcs_addresses()
            if not found:
                raise ConfigError("execution.address: auto, but no Ray cluster runs on this "
                                  "machine (start one with `ray start --head`, or set "
                                  "execution.address to null for a local instance)")
            address = sorted(found)[0]
    target = _host_port(address)
    if target is None:
        raise ConfigError(f"execution.address: expected null, auto, host:port or "
                          f"ray://host:port, got {exe.address!r}")
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"execution.address: cannot reach Ray at {exe.address} "
                          f"({exc.strerror or exc})") from None


@contextmanager
def ray_session(exe: ExecutionConfig) -> Iterator[None]:
    """Ray connected for the block: joins execution.address, or starts a local instance with
    execution.workers CPUs (stopped afterwards). Nothing to do when Ray is up already."""
    import ray

    if ray.is_initialized():
        yield
        return
    check_address(exe)
    with _without_run_id():
        if exe.address is None:
            ray.init(num_cpus=exe.workers, include_dashboard=False, log_to_driver=False,
                     object_store_memory=OBJECT_STORE_BYTES, configure_logging=False)
        else:
            ray.init(address=exe.address, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _call(fn: Callable[..., Any], threads: int, shared: Any, item: Any) -> Any:
    keep_freed_memory()
    set_torch_threads(threads)
    return fn(shared, item)


_POOL_TASK: tuple[Callable[[Any, Any], Any], Any] | None = None   # in a pool worker

# What the fork server imports once, so that a pool's workers start in a fraction of a second
# instead of ~3 s each (torch, pandas, scipy, sklearn): torch, the first torch.optim optimizer's
# own import (torch._dynamo, 0.6-1 s a process) and the module of every unit a pool runs
# (tests/test_pool.py checks that list against the callers of map_unordered).
POOL_MODULES = ("reduce_ops.resilience", "reduce_ops.compare", "reduce_ops.robustness",
                "reduce_ops.retraining.schedule", "reduce_ops.stages.variants")
_PRELOAD = ("torch", "torch._dynamo", *POOL_MODULES)


@functools.cache
def start_method() -> str:
    """How a local pool starts its workers: forked from a fork server that imported _PRELOAD
    once (Linux >= 5.3: a worker watches its driver through a pidfd), else spawned (a clean
    interpreter each, imports and all)."""
    import multiprocessing

    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return "spawn"
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


_SERVER_STARTED = False          # start_pool_server started the fork server in this process


def start_pool_server(exe: ExecutionConfig) -> None:
    """Where `exe` runs units in a local pool, start its fork server now, without waiting: it
    imports while the stage reads its inputs (a stage calls this first). Once per process; a
    pool starts it itself otherwise. Its environment (without MLFLOW_RUN_ID) and its
    stdout/stderr are this process's now: a variable set later does not reach the workers
    (each gets the driver's sys.path and folder when it starts)."""
    if exe.backend != "local" or exe.workers <= 1 or start_method() != "forkserver":
        return
    import multiprocessing
    import multiprocessing.forkserver

    global _SERVER_STARTED
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(_PRELOAD))
    with _without_run_id():
        multiprocessing.forkserver.ensure_running()
    _SERVER_STARTED = True


def helper_start_method() -> str:
    """How a helper process of a stage (`fat`'s logger) starts: forked from the fork server
    where the stage started one (torch and the stage's modules come imported: 3-4 CPU-s less
    on a 2-core machine that trains meanwhile), else spawned. A forked helper is not the
    driver's child: it must tie itself to the driver with processes.die_with_starter."""
    return "forkserver" if _SERVER_STARTED else "spawn"


def _pool_init(fn: Callable[[Any, Any], Any], shared: Any, threads: int, driver: int,
               method: str) -> None:
    import signal

    from reduce_ops.processes import die_with_starter

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the driver's to handle
    die_with_starter(driver, method)
    keep_freed_memory()
    set_torch_threads(threads)
    global _POOL_TASK
    _POOL_TASK = (fn, shared)


def _pool_call(item: Any) -> Any:
    fn, shared = _POOL_TASK
    return fn(shared, item)


def _pool_map(fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any],
              exe: ExecutionConfig, on_result: Callable[[int, Any], None]) -> None:
    """map_unordered on a pool of execution.workers processes of this machine (forked from the
    fork server, or spawned: see start_method; `shared` sent once to each, its tensors in
    shared memory as multiprocessing's torch reductions put them). A worker that dies breaks
    the pool: the units not yet returned run again in a fresh one, at most RETRIES times."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    method = start_method()
    start_pool_server(exe)
    todo = dict(enumerate(items))
    deaths = 0
    while todo:
        pool = ProcessPoolExecutor(
            min(exe.workers, len(todo)), mp_context=multiprocessing.get_context(method),
            initializer=_pool_init,
            initargs=(fn, shared, worker_threads(exe), os.getpid(), method))
        try:
            with _without_run_id():              # the workers start on the first submits
                pending = {pool.submit(_pool_call, item): i for i, item in todo.items()}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    result = future.result()          # a unit's own error ends the stage here
                    del todo[i]
                    on_result(i, result)
        except BrokenProcessPool:
            deaths += 1
            if deaths > RETRIES:
                raise WorkerDiedError(
                    f"execution.workers: a worker process died {deaths} times (killed, or out "
                    f"of memory) with {len(todo)} of {len(items)} units left; the finished "
                    f"ones are recorded (fewer workers need less memory)") from None
        finally:
            _stop_pool(pool)


def _stop_pool(pool: Any) -> None:
    """Shut a pool down now: queued units are dropped, running ones killed (an error or
    Ctrl-C in the driver must not wait for them)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join()


def map_unordered(fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any],
                  exe: ExecutionConfig, on_result: Callable[[int, Any], None]) -> None:
    """`fn(shared, item)` for every item; `on_result(index, result)` on the driver as each one
    finishes (in order with one local worker, in finishing order in a pool or on Ray).
    `shared` (model, data) goes to each worker (or Ray's object store) once. At most
    execution.workers tasks are in flight; a task whose worker died is retried (RETRIES
    times). Each worker process runs worker_threads(exe) torch threads: a pool gives what one
    worker at that many threads gives, to the bit."""
    if exe.backend == "local" and exe.workers > 1 and len(items) > 1:
        _pool_map(fn, shared, items, exe, on_result)
        return
    if exe.backend == "local":
        import torch

        before = torch.get_num_threads()
        set_torch_threads(worker_threads(exe))
        try:
            for i, item in enumerate(items):
                on_result(i, fn(shared, item))
        finally:
            torch.set_num_threads(before)
        return
    import ray

    with ray_session(exe):
        task = ray.remote(num_cpus=1, max_retries=RETRIES)(_call)
        shared_ref = ray.put(shared)
        pending: dict[Any, int] = {}
        todo = list(enumerate(items))
        todo.reverse()
        try:
            while todo or pending:
                while todo and len(pending) < exe.workers:
                    i, item = todo.pop()
                    pending[task.remote(fn, worker_threads(exe), shared_ref, item)] = i
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    on_result(pending.pop(ref), ray.get(ref))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

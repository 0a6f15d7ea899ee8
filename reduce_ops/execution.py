"""Where independent units of work run: one after another in this process (`local`), or as Ray
tasks (`ray`) on a local Ray instance or a cluster.

Workers only compute: they get their inputs, return plain results, and never touch MLflow; the
driver logs each result as it arrives (explicit run ids, the same parent/child structure as
`local`). A task whose worker dies (killed, out of memory, a lost node) is retried by Ray.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from reduce_ops.config import ExecutionConfig
from reduce_ops.errors import ConfigError

LOCAL = ExecutionConfig("local", None, 1, 0)   # in this process, torch's default threads
RETRIES = 3                       # a task whose worker died runs again, at most this often
OBJECT_STORE_BYTES = 200 * 2**20  # local instance: Ray's default is 30% of the machine's memory


def set_torch_threads(threads: int) -> None:
    """torch's intra-op threads for this process (0 leaves torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


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
    # Workers must not inherit the driver's MLflow run: they never log.
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        if exe.address is None:
            ray.init(num_cpus=exe.workers, include_dashboard=False, log_to_driver=False,
                     object_store_memory=OBJECT_STORE_BYTES, configure_logging=False)
        else:
            ray.init(address=exe.address, log_to_driver=False, configure_logging=False)
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved
    try:
        yield
    finally:
        ray.shutdown()


def _call(fn: Callable[..., Any], threads: int, shared: Any, item: Any) -> Any:
    set_torch_threads(threads)
    return fn(shared, item)


def map_unordered(fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any],
                  exe: ExecutionConfig, on_result: Callable[[int, Any], None]) -> None:
    """`fn(shared, item)` for every item; `on_result(index, result)` on the driver as each one
    finishes (in order with `local`, in finishing order with `ray`). `shared` (model, data)
    goes to the object store once. At most execution.workers tasks are in flight; a task whose
    worker died is retried (RETRIES times)."""
    if exe.backend == "local":
        import torch

        before = torch.get_num_threads()
        set_torch_threads(exe.torch_threads)
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
                    pending[task.remote(fn, exe.torch_threads, shared_ref, item)] = i
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    on_result(pending.pop(ref), ray.get(ref))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

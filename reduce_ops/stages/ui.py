"""`reduce-ops ui`: the MLflow UI on this project's runs, opened on its training runs."""

from __future__ import annotations

import errno
import socket

from reduce_ops import processes
from reduce_ops.config import Config
from reduce_ops.errors import ReduceOpsError
from reduce_ops.tracking.store import experiment_page, tracking_uri, ui_command


def run(cfg: Config, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Serve the local store with `mlflow ui` (until Ctrl-C) and print where to look; for a
    tracking server (MLFLOW_TRACKING_URI=http...) only print the address on that server. The
    MLflow server and all its workers stop with reduce-ops, however it ends (see processes)."""
    if not 1 <= port <= 65535:
        raise ReduceOpsError(f"--port {port}: a port is a number from 1 to 65535")
    uri = tracking_uri(cfg.root)
    if uri.startswith(("http://", "https://")):
        print(f"runs: {experiment_page(uri, uri, cfg.tracking.experiment)}")
        return 0
    check_free(host, port)
    base = f"http://{host}:{port}"
    print(f"MLflow UI for {uri} at {base}; the runs of experiment {cfg.tracking.experiment!r}: "
          f"{experiment_page(base, uri, cfg.tracking.experiment)} (Ctrl-C stops it)",
          flush=True)
    processes.serve(ui_command(uri, host, port), cwd=cfg.root, what="the MLflow UI")


def check_free(host: str, port: int) -> None:
    """A one-line error unless this host can listen on `port` (bound and released at once, as
    uvicorn binds: with SO_REUSEADDR, so connections in TIME_WAIT do not count as in use)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ReduceOpsError(f"--host {host}: unknown address ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ReduceOpsError(f"--port {port}: {host}:{port} is already in use (another "
                                     f"server?); choose another --port") from None
            raise ReduceOpsError(f"--host {host} --port {port}: cannot listen there "
                                 f"({exc.strerror})") from None

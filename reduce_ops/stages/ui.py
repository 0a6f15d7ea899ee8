"""`reduce-ops ui`: the MLflow UI on this project's runs, opened on its training runs."""

from __future__ import annotations

import subprocess

from reduce_ops import tracking
from reduce_ops.config import Config


def run(cfg: Config, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Serve the local store with `mlflow ui` (until Ctrl-C) and print where to look; for a
    tracking server (MLFLOW_TRACKING_URI=http...) only print the address on that server."""
    uri = tracking.tracking_uri(cfg.root)
    if uri.startswith(("http://", "https://")):
        print(f"runs: {tracking.experiment_page(uri, uri, cfg.tracking.experiment)}")
        return 0
    base = f"http://{host}:{port}"
    print(f"MLflow UI for {uri} at {base}; the runs of experiment {cfg.tracking.experiment!r}: "
          f"{tracking.experiment_page(base, uri, cfg.tracking.experiment)} (Ctrl-C stops it)",
          flush=True)
    return subprocess.call(tracking.ui_command(uri, host, port), cwd=cfg.root)

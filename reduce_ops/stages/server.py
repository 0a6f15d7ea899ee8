"""`reduce-ops server`: the team tracking server (PostgreSQL backend store, MLflow server with
served artifacts) on this machine, until Ctrl-C."""

from __future__ import annotations

from pathlib import Path

from reduce_ops import teamserver
from reduce_ops.config import Config


def run(cfg: Config, folder: Path, port: int = 5000, pg_port: int = 5433) -> int:
    """Start PostgreSQL (installed when missing) and `mlflow server` with state in `folder`
    (relative to the project root) and serve until Ctrl-C."""
    return teamserver.run(folder if folder.is_absolute() else cfg.root / folder, port, pg_port)

"""A throw-away copy of the project for the benchmarks that run whole pipelines."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_project(root: Path, names: list[str]) -> None:
    """Copy the repository's `names` (files or folders, caches left out) into `root`."""
    for name in names:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)

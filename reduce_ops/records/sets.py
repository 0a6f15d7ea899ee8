"""A record's files as one set: written together into a temporary folder that replaces the
record's folder in one step, with the summary naming the sha256 of every other file, so that a
reader can tell a set one run wrote from a mix (an older writer, a copy, a hand edit)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reduce_ops import atomic
from reduce_ops.errors import DataError

FILES_KEY = "files"          # summary.json: {file name: sha256} of the record's other files


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def record_dir(out_dir: Path, stage: str, *names: str) -> Iterator[Path]:
    """A temporary folder for the record's files; on success it replaces `out_dir` as a whole
    (an old record of `stage` only: a folder holding anything else is refused). `names`: the
    files the record holds (what a record written before folders were marked may hold)."""
    with atomic.atomic_dir(out_dir, stage, atomic.only_files(*names)) as tmp:
        yield tmp


def digests(folder: Path, *names: str) -> dict[str, str]:
    """{name: sha256} of the files `names` in `folder` that exist."""
    return {name: sha256(folder / name) for name in names if (folder / name).is_file()}


def check(folder: Path, summary: Mapping[str, Any], summary_file: str, stage: str) -> None:
    """One DataError line when a file of the record is missing or is not the one its summary
    was written with. A summary without digests (written before they were kept) is taken as
    it is."""
    recorded = summary.get(FILES_KEY)
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise DataError(f"{folder / summary_file}: unreadable '{FILES_KEY}'; run "
                        f"`reduce-ops {stage}` again")
    for name, digest in recorded.items():
        path = folder / str(name)
        if not path.is_file() or sha256(path) != digest:
            what = (f"missing, though {summary_file} lists it" if not path.is_file() else
                    f"not the file {summary_file} was written with")
            raise DataError(f"{path}: {what} (a mixed or interrupted record); run "
                            f"`reduce-ops {stage}` again")

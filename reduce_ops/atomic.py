"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything a stage writes goes through here: a temporary sibling (same filesystem, so the final
rename is atomic) is written first and renamed over the target; on any error it is removed and an
existing target is left as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden name next to `path` (same folder, so a rename onto `path` is atomic)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_file(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp) on a temporary file next to `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last: some writers (savefig, np.save) pick the format from it
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _finite(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers (DVC's metrics reader agrees)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path | str, obj: object) -> Path:
    """`obj` as indented, key-sorted JSON (NaN and infinities as null), atomically."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    return write_file(path, lambda tmp: tmp.write_text(text))


def write_csv(df: Any, path: Path | str) -> Path:
    """A pandas DataFrame as CSV (no index), atomically."""
    return write_file(path, lambda tmp: df.to_csv(tmp, index=False))


def replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Move new_dir to out_dir; an old out_dir is moved aside first and restored on failure."""
    if not out_dir.exists():
        os.replace(new_dir, out_dir)
        return
    old_dir = temp_sibling(out_dir, "old")
    os.replace(out_dir, old_dir)
    try:
        os.replace(new_dir, out_dir)
    except BaseException:
        os.replace(old_dir, out_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `out_dir`, on error it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out_dir)
    tmp.mkdir()          # default permissions (mkdtemp would make it readable by the owner only)
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

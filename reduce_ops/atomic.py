"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything a stage writes goes through here: a temporary sibling (same filesystem, so the final
rename is atomic) is written first and renamed over the target; on any error it is removed and an
existing target is left as it was. A folder is replaced only when its marker says this writer made
it and holds nothing else (a user's folder or file is never deleted), and old and new are swapped
in one step where the system allows.
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


def not_a_file_reason(path: Path) -> str:
    """Why `path` (named like an input file) cannot be read as one: a dangling link, a link
    loop, a folder, or nothing there."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "a symbolic link loop"
        except OSError:
            return f"a dangling symbolic link (to {os.readlink(path)})"
        return "a symbolic link to something that is not a file"
    return "not a regular file" if path.exists() else "file not found"


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


MARKER = ".reduce-ops-output"      # in every folder atomic_dir writes: which writer owns it
# files that tools keep inside an output folder (DVC lists a stage's file outputs in the
# folder's .gitignore): not the user's data, and carried over into the folder that replaces it
CARRIED = (".gitignore", ".dvcignore")
_RENAME_EXCHANGE = 2                 # renameat2 flag: swap two paths in one step (Linux)
_AT_FDCWD = -100


def owner_of(folder: Path) -> str | None:
    """The writer kind that `folder`'s marker names, or None when it has no marker."""
    lines = _marker_lines(folder)
    return lines[0] if lines else None


def _marker_lines(folder: Path) -> list[str]:
    try:
        return [s for s in (Path(folder) / MARKER).read_text().splitlines() if s.strip()]
    except (OSError, UnicodeDecodeError):
        return []


def _files_in(folder: Path) -> set[str]:
    """Every file (or link) under `folder` but the marker, as a relative POSIX path."""
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
            if (p.is_file() or p.is_symlink()) and p.name != MARKER
            and p.relative_to(folder).as_posix() not in CARRIED}


def mark(folder: Path, kind: str) -> None:
    """Write `folder`'s marker: the writer kind, then every file it holds now (so that a file
    put there later is noticed before the folder is replaced)."""
    text = "\n".join([kind, *sorted(_files_in(folder))]) + "\n"
    (Path(folder) / MARKER).write_text(text, encoding="utf-8")


def check_replaceable(out_dir: Path, kind: str,
                      legacy: Callable[[Path], bool] | None = None) -> None:
    """Refuse (one ReduceOpsError line) to replace `out_dir` unless it is absent, empty, or a
    folder this writer kind made: its marker names `kind`, or (written before markers existed)
    `legacy(out_dir)` recognises every file in it as this writer's own."""
    from reduce_ops.errors import ReduceOpsError

    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise ReduceOpsError(f"{out_dir}: exists and is not a folder; reduce-ops {kind} writes "
                             f"a folder there: move the file away or choose another path")
    owner = owner_of(out_dir)
    if owner == kind:
        listed = _marker_lines(out_dir)[1:]
        strangers = sorted(_files_in(out_dir) - set(listed)) if listed else []
        if strangers:
            raise ReduceOpsError(f"{out_dir}: holds file(s) reduce-ops {kind} did not write "
                                 f"({', '.join(strangers[:3])}"
                                 f"{' ...' if len(strangers) > 3 else ''}); replacing the "
                                 f"folder would delete them: move them away")
        return
    if owner is not None:
        raise ReduceOpsError(f"{out_dir}: holds the output of reduce-ops {owner}, not {kind}; "
                             f"give each its own path")
    try:
        empty = not any(e.name not in CARRIED for e in out_dir.iterdir())
    except OSError as exc:
        raise ReduceOpsError(f"{out_dir}: cannot read the folder ({exc.strerror})") from None
    if empty or (legacy is not None and legacy(out_dir)):
        return
    raise ReduceOpsError(f"{out_dir}: a folder that reduce-ops {kind} did not write (no "
                         f"{MARKER} in it) and that is not empty; it would be replaced: move "
                         f"it away or choose another path")


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths a and b in one atomic step (renameat2 RENAME_EXCHANGE); False where the
    system or filesystem cannot."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Move new_dir to out_dir. An old out_dir is swapped with new_dir in one step where the
    system allows (a reader, or a kill at any moment, sees the old folder or the new one),
    else moved aside first and restored on failure; then removed."""
    if not out_dir.exists() and not out_dir.is_symlink():
        os.replace(new_dir, out_dir)
        return
    if _exchange(new_dir, out_dir):
        _remove(new_dir)                     # now holds the old folder
        return
    old_dir = temp_sibling(out_dir, "old")
    os.replace(out_dir, old_dir)
    try:
        os.replace(new_dir, out_dir)
    except BaseException:
        os.replace(old_dir, out_dir)
        raise
    _remove(old_dir)


def sweep(out_dir: Path, tags: tuple[str, ...] = ("tmp", "old")) -> None:
    """Remove temporary siblings of out_dir left by writers that were killed (their process
    is gone): `.NAME.TAG-PID-...` for each of `tags` (temp_sibling's names)."""
    prefix = f".{out_dir.name}."
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        tag, _, rest = entry.name[len(prefix):].partition("-")
        pid = rest.split("-", 1)[0]
        if tag in tags and pid.isdigit() and not _alive(int(pid)):
            _remove(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_dir(out_dir: Path | str, kind: str,
               legacy: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it gets its marker (`kind` and the files
    written) and replaces `out_dir`, on error it is removed. An existing `out_dir` is replaced
    only when this writer made it and holds only what it wrote (see check_replaceable):
    nothing else is ever deleted."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, kind, legacy)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep(out_dir)
    tmp = temp_sibling(out_dir)
    tmp.mkdir()          # default permissions (mkdtemp would make it readable by the owner only)
    try:
        yield tmp
        mark(tmp, kind)
        check_replaceable(out_dir, kind, legacy)    # still ours (nothing appeared meanwhile)
        for name in CARRIED:
            if (out_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(out_dir / name, tmp / name)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def only_files(*patterns: str) -> Callable[[Path], bool]:
    """A `legacy` test for atomic_dir: every entry of the folder is a plain file whose name
    matches one of the glob `patterns` (an output written before folders were marked)."""
    from fnmatch import fnmatchcase

    def test(folder: Path) -> bool:
        entries = [e for e in folder.iterdir() if e.name not in CARRIED]
        return all(e.is_file() and not e.is_symlink()
                   and any(fnmatchcase(e.name, p) for p in patterns) for e in entries)

    return test

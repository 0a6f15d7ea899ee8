"""A user's own code, named in params as package.module:function (model.factory,
data.function): imported from an installed package or from the folder paths.code names, and
called; every failure is one line naming the params key."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from reduce_ops.errors import ConfigError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def add_code_dir(code: Path | None) -> None:
    """Put paths.code first on sys.path (once), so that its packages import; processes spawned
    later (the logging process, local workers) inherit it."""
    if code is None:
        return
    if not code.is_dir():
        raise ConfigError(f"paths.code: {code}: no such folder")
    if str(code) not in sys.path:
        sys.path.insert(0, str(code))
        importlib.invalidate_caches()


def import_object(spec: str, code: Path | None, key: str) -> Any:
    """The object `spec` ('package.module:attr.attr') names, imported with paths.code on
    sys.path."""
    add_code_dir(code)
    module_name, _, attr = spec.partition(":")
    where = f" in {code} or the installed packages" if code else \
        " (install your package, or set paths.code to the folder that holds it)"
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError or whatever the module raises
        raise ConfigError(f"{key}: cannot import {module_name!r}{where}: "
                          f"{_first_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {spec} is a {type(obj).__name__}, not a function")
    return obj


def call(spec: str, code: Path | None, key: str) -> Any:
    """Import `spec` and call it with no arguments; an exception it raises is one line."""
    fn = import_object(spec, code, key)
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the user's code: report, do not trace back
        raise ConfigError(f"{key}: {spec}() raised {_first_line(exc)}") from None


def module_file(spec: str, code: Path | None, key: str) -> Path | None:
    """The source file of the module `spec` names, found without running it (its parent
    packages are imported); None for a module without a file."""
    add_code_dir(code)
    module_name = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except Exception as exc:  # noqa: BLE001 - a parent package that fails to import
        raise ConfigError(f"{key}: cannot import {module_name!r}: {_first_line(exc)}") from None
    if found is None:
        raise ConfigError(f"{key}: cannot import {module_name!r}: no such module (install your "
                          f"package, or set paths.code to the folder that holds it)")
    return Path(found.origin) if found.origin and Path(found.origin).is_file() else None

"""What the benchmark scripts share: the repository root, a median timer, and stages of the
pipeline run in subprocesses in throw-away copies of the project.

Importing this module puts the repository first on sys.path, so that a script run as
`python benchmarks/<script>.py` imports this checkout's reduce_ops.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reduce_ops.config import apply_overrides, read_yaml  # noqa: E402

# What `reduce-ops <stage>` needs in a copy of the project.
PIPELINE_FILES = ("params.yaml", "dvc.yaml", "MLproject", "reduce_ops")


def interleaved_ms(fns: Mapping[str, Callable[[], object]], repeats: int,
                   warmup: int = 1) -> dict[str, list[float]]:
    """Wall ms of each fn() over `repeats` rounds, after `warmup` untimed rounds."""
    # Each round calls every fn in turn, so that load from other processes hits all alike.
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            times[name].append((time.perf_counter() - start) * 1e3)
            del result  # freed after the clock stopped, not in the next call's time
    return times


def times_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of `repeats` calls of fn() in milliseconds, after `warmup` untimed calls."""
    return interleaved_ms({"fn": fn}, repeats, warmup)["fn"]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds, after `warmup` untimed calls."""
    return statistics.median(times_ms(fn, repeats, warmup))


def medians_ms(fns: Mapping[str, Callable[[], object]], repeats: int,
               warmup: int = 1) -> dict[str, float]:
    """Median wall ms of each fn(), timed interleaved as in `interleaved_ms`."""
    return {name: statistics.median(t) for name, t in interleaved_ms(fns, repeats, warmup).items()}


def copy_project(root: Path, extra: Sequence[str] = ()) -> None:
    """Copy PIPELINE_FILES and the repository's `extra` files or folders (no caches) into `root`."""
    for name in (*PIPELINE_FILES, *extra):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)


@contextlib.contextmanager
def throwaway_copy(prefix: str, extra: Sequence[str] = ()) -> Iterator[Path]:
    """A copy of the project (`copy_project`) in a temporary folder, removed on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        copy_project(root, extra)
        yield root


def run_and_keep(prefix: str, stages: Sequence[str], sets: Sequence[str],
                 kept: Mapping[str, str], out: Path, what: str, threads: int | None = None,
                 params: Path | None = None) -> float:
    """`stages` with `sets` in a throw-away copy (its own MLflow store; `params` in place of
    params.yaml when given), then the files `kept` ({name in out: path in the copy}) copied
    into `out`; returns the seconds the stages took."""
    with throwaway_copy(prefix, ["data/fault_maps"]) as root:
        if params is not None:
            shutil.copyfile(params, root / "params.yaml")
        env = stage_env(root, sqlite_store(root), threads)
        t0 = time.perf_counter()
        run_stages(root, stages, sets, env, what)
        seconds = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        for name, path in kept.items():
            shutil.copyfile(root / path, out / name)
    return seconds


def write_params(root: Path, overrides: Sequence[str]) -> None:
    """The repository's params.yaml with `overrides` (KEY=VALUE) applied -> root/params.yaml."""
    params = apply_overrides(read_yaml(REPO / "params.yaml"), list(overrides))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def sqlite_store(root: Path) -> str:
    """Tracking URI of an MLflow store of the copy's own: root/mlflow.db."""
    return f"sqlite:///{root / 'mlflow.db'}"


def stage_env(root: Path, tracking_uri: str | None = None,
              threads: int | None = None) -> dict[str, str]:
    """A stage's environment in copy `root`: its code, no parent run, its MLflow store."""
    # tracking_uri None: the copy's default store; threads: OMP/MKL threads (None: inherited)
    drop = {"MLFLOW_RUN_ID"}
    if tracking_uri is None:  # inherited URIs would point the copy's runs elsewhere
        drop |= {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(root)
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def set_options(sets: Sequence[str]) -> list[str]:
    """`--set KEY=VALUE` options for each of `sets`."""
    return [a for s in sets for a in ("--set", s)]


def stage_command(root: Path, stage: str, sets: Sequence[str] = ()) -> list[str]:
    """argv of `reduce-ops <stage>` on the copy's params.yaml with the `sets` overrides."""
    return [sys.executable, "-m", "reduce_ops", stage, "--params", str(root / "params.yaml"),
            *set_options(sets)]


def run_checked(cmd: list[str], env: Mapping[str, str], what: str,
                cwd: Path | None = None) -> float:
    """Seconds cmd ran to its end; if it fails, exit with "`what` failed" and its stderr's tail."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def run_stages(root: Path, stages: Sequence[str], sets: Sequence[str], env: Mapping[str, str],
               what: str) -> None:
    """Run `stages` one by one in copy `root` with `sets`; a failure exits, naming `what`."""
    for stage in stages:
        run_checked(stage_command(root, stage, sets), env, f"{what}: reduce-ops {stage}", cwd=root)

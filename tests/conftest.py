"""Shared fixtures: the real params.yaml, shrunk to tiny data, in a throw-away project folder."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import yaml

from reduce_ops.config import Config, apply_overrides, from_dict, read_yaml

REPO = Path(__file__).resolve().parents[1]

# Tiny settings every test starts from: digits (bundled with scikit-learn), a few epochs.
TINY = [
    "data.source=digits",
    "train.max_epochs=8",
    "train.patience=3",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.device=cpu",
    "train.augment_shift=0",
    "hardware.rows=16",
    "hardware.cols=16",
    "faultmaps.n_chips=4",
    "flatness.draws=3",
    "variants=[]",
    # the default constraint (absolute 0.951) is for LeNet on the MNIST subset; on digits the
    # pipeline tests use a drop from their own baseline with a flat margin (one check), and the
    # tests of the guard band (tests/test_shipping.py, test_yield_pipeline) set theirs
    "constraint.kind=drop",
    "constraint.value=0.01",
    "verify.margin=0.0075",
    "verify.escape_rate=null",
    "verify.pool=1",          # tests that need variants name their own
    "execution.workers=1",    # in the test process; tests/test_pool.py runs the default pool
    "plan.fleet_budget=null",  # chips beyond the edge rejected (test_spare_budget sets one)
]

# --- Named setups: overrides that more than one test module builds its project from ----------
# A test module's own list adds only what is its own to these; tiny_pipeline builds the project.

# The tiny resilience grid and plan: 2 fault maps per rate, trials of at most half an epoch
# measured every quarter, and at most 1 epoch of FAT for any chip.
TINY_GRID = ["resilience.repetitions=2", "resilience.max_epochs=0.5",
             "resilience.checkpoint_every=0.25", "plan.budget_cap=1.0"]

# Fleets that FAT retrains (test_fleet, test_grouping, test_execution, test_stuck_fleet): a
# 4-epoch baseline, and FAT steps (lr 0.01) big enough for chips to recover within TINY_GRID.
TINY_FAT = ["train.max_epochs=4", "fat.lr=0.01"]

# Planning against a drop of 0.1 from the baseline's accuracy; a fault rate is planned when half
# its repetitions reached (test_grouping, test_execution, test_stuck_fleet).
DROP_PLAN = ["plan.min_reached=0.5", "constraint.kind=drop", "constraint.value=0.1"]

# The stages up to a fleet's groups: what `fat` reads.
THROUGH_GROUP = ["prepare", "pretrain", "faultmaps", "resilience", "plan", "group"]

# 8 chips from 2 wafers whose chips share defects, so that eFAT finds groups (test_grouping,
# test_execution).
WAFER_FLEET = [*TINY_FAT, "faultmaps.generator=wafer", "faultmaps.n_chips=8",
               "faultmaps.chips_per_wafer=4", "faultmaps.rate_max=0.3",
               "resilience.fault_rates=[0.0, 0.1, 0.2, 0.3]", *TINY_GRID, *DROP_PLAN,
               "compare.fixed_epochs=[0.25, 0.5]"]

# Small enough for every stage of dvc.yaml to run in seconds on digits (test_e2e_foundation,
# test_teamserver).
TINY_PIPELINE = ["train.max_epochs=2", "resilience.fault_rates=[0.0, 0.3]", *TINY_GRID,
                 "compare.fixed_epochs=[0.25, 0.5]", "constraint.kind=drop",
                 "constraint.value=0.2"]

# Baselines whose int8 weights take bit faults: a 3-epoch baseline, 2 draws per BER
# (test_robustness, test_variants).
TINY_BER = ["train.max_epochs=3", "robustness.repetitions=2"]

# What a copy of the project needs to run its stages (code, pipeline, entry points).
PROJECT_FILES = ["params.yaml", "dvc.yaml", "MLproject", "python_env.yaml", "requirements.txt",
                 "pyproject.toml", "reduce_ops", "data/fault_maps"]


def tiny_params(overrides: list[str] | None = None) -> dict:
    """The repository's params.yaml with the tiny overrides (and any extra) applied."""
    return apply_overrides(read_yaml(REPO / "params.yaml"), TINY + list(overrides or []))


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never touch a user's tracking server or the repository's mlflow.db from a test."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    # mlflow.set_registry_uri (tracking.store.ensure_store) writes this variable into os.environ:
    # without this a test's store would leak into later tests and their subprocesses
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    # ...and into mlflow's own module global, which outlives the variable: a later test's
    # MlflowClient(uri) would read the registry of an earlier test's store
    monkeypatch.setattr("mlflow.tracking._model_registry.utils._registry_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    """A validated Config on digits whose paths all live under tmp_path."""
    return dataclasses.replace(from_dict(tiny_params()), root=tmp_path)


def make_project(dest: Path, overrides: list[str] | None = None) -> Path:
    """Copy the project's files into `dest` with a tiny params.yaml; returns the params path."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"),
                            dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest / name)
    params = dest / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    return params


def clone_project(src: Path, dest: Path, overrides: list[str] | None = None) -> Path:
    """A copy of a project folder (its MLflow store included) for a test that changes it, with
    `overrides` set in its params.yaml; the copy's runs still write artifacts under `src`, so
    `src` must outlive the copy."""
    shutil.copytree(src, dest)
    if overrides:
        params = dest / "params.yaml"
        params.write_text(yaml.safe_dump(apply_overrides(read_yaml(params), list(overrides)),
                                         sort_keys=False))
    return dest


def run_stages(root: Path, *stages: str) -> None:
    """Run stages on a project with its own mlflow.db (MLFLOW_TRACKING_URI unset meanwhile)."""
    from reduce_ops.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)   # the project's own mlflow.db
        mp.chdir(root)                                     # MLflow artifacts under the project
        for stage in stages:
            assert main([stage, "--params", str(root / "params.yaml")]) == 0, stage


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory
                  ) -> Callable[[str, list[str], Sequence[str]], Path]:
    """`tiny_pipeline(name, overrides, stages) -> Path`: a tiny project (make_project with
    `overrides`) with `stages` run, built once per session for each distinct pair of effective
    params and stages, so modules that ask for the same project share it; `name` names the
    folder of the first to ask. Shared and read-only: a test that changes a project (runs a
    stage, edits a file) works on `clone_project(project, tmp_path / ...)` of it."""
    built: dict[tuple[str, tuple[str, ...]], Path] = {}

    def build(name: str, overrides: list[str], stages: Sequence[str]) -> Path:
        key = (json.dumps(tiny_params(overrides), sort_keys=True), tuple(stages))
        if key not in built:
            root = tmp_path_factory.mktemp(name)
            make_project(root, overrides)
            run_stages(root, *stages)
            built[key] = root
        return built[key]

    return build


def grid_trials(prepared_digits, exe, grid: list[str], target=None) -> list:
    """The resilience trials of `grid` (overrides of the tiny params) on an untrained LeNet
    run on `exe` (to `target`, a TrialTarget: by default settled at once); every trial reached
    the driver, and they come back in grid order."""
    import torch

    from reduce_ops import resilience
    from reduce_ops.models import build_model

    cfg = from_dict(tiny_params(grid))
    torch.manual_seed(0)
    baseline = build_model("lenet", prepared_digits.x["train"].shape[1:], 10)
    specs = resilience.trial_grid(cfg.resilience)
    seen: list[str] = []
    results = resilience.run_trials(baseline, prepared_digits, specs, cfg.resilience, cfg.fat,
                                    cfg.hardware,
                                    target or resilience.TrialTarget(0.0, 1.0, 0.0), "cpu",
                                    {}, lambda r: seen.append(r.spec.key), exe=exe)
    assert sorted(seen) == sorted(s.key for s in specs)       # every trial reached the driver
    assert [r.spec for r in results] == specs                 # returned in grid order
    return results


def fat_and_compare(base: Path, dest: Path, sets: list[str],
                    monkeypatch: pytest.MonkeyPatch) -> Path:
    """`fat` then `compare` in a copy of project `base` (clone_project) with `sets` in its
    params, against the copy's own MLflow store; returns the copy."""
    from reduce_ops.cli import main

    root = clone_project(base, dest, sets)
    monkeypatch.chdir(root)
    for leaked in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # mlflow sets them
        monkeypatch.delenv(leaked, raising=False)            # each project its own store
    for stage in ("fat", "compare"):
        assert main([stage, "--params", str(root / "params.yaml")]) == 0
    return root


def trained_chips(root: Path):
    """results/fat/chips.csv without what only says which run or version, or how long."""
    import pandas as pd

    return pd.read_csv(root / "results/fat/chips.csv").drop(
        columns=["model_version", "champion_version", "run_id", "train_seconds",
                 "log_model_seconds"])


_KILL_AFTER = """
import functools, importlib, os, signal, sys
module = importlib.import_module(sys.argv[1])
owner_name, _, attr = sys.argv[2].rpartition(".")
owner = getattr(module, owner_name) if owner_name else module
original, left = getattr(owner, attr), [int(sys.argv[3])]

@functools.wraps(original)
def counted(*args, **kwargs):
    result = original(*args, **kwargs)
    left[0] -= 1
    if left[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, attr, counted)
from reduce_ops.cli import main
sys.exit(main(sys.argv[4:]))
"""


def run_killed_after(root: Path, argv: list[str], module: str, function: str,
                     calls: int) -> subprocess.CompletedProcess:
    """Run `reduce-ops ARGV` in a fresh process in `root` (its own mlflow.db) that SIGKILLs itself
    right after the `calls`-th return of `module.function` ("Class.method" allowed): a crash at a
    chosen point, with no handler, no `finally` and no ended run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI")}
    return subprocess.run([sys.executable, "-c", _KILL_AFTER, module, function, str(calls), *argv],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(project: Path, port: int, log: Path) -> subprocess.Popen:
    """`reduce-ops ui` on `port` in `project`, on the project's own mlflow.db; its stderr goes
    to `log` (a file: a full pipe would stall the server), its stdout is a pipe (the address)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with log.open("w") as stderr:
        return subprocess.Popen([str(Path(sys.executable).parent / "reduce-ops"), "ui",
                                 "--port", str(port)], cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)


def wait_until_healthy(ui: subprocess.Popen, port: int, log: Path, timeout: float = 180) -> None:
    """Until the UI on `port` answers /health; fails with its log if it exits or is late."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert ui.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.read() == b"OK":
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)


def make_every_check_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every verification check of `fat` misses (a 0.9 margin on the rule), in this process."""
    from reduce_ops.retraining import worker

    def never_passes(real):
        def train(unit, baseline, data, settings, *args):  # noqa: ANN001, ANN002
            rule = dataclasses.replace(settings.rule, margin=0.9)
            return real(unit, baseline, data, dataclasses.replace(settings, rule=rule), *args)
        return train

    monkeypatch.setattr(worker, "train", never_passes(worker.train))   # one by one
    monkeypatch.setattr(worker, "train_batch", never_passes(worker.train_batch))   # batched


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module's tests, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory):
    """The digits split prepared once per session (read-only for tests)."""
    from reduce_ops.data import load_prepared, prepare

    root = tmp_path_factory.mktemp("digits")
    cfg = dataclasses.replace(from_dict(tiny_params()), root=root)
    prepare(cfg.data, cfg.path("raw"), cfg.path("prepared"))
    return load_prepared(cfg.path("prepared"))


# --- No process outlives the suite ------------------------------------------------------------
# pytest becomes a child subreaper (Linux): a process that a test starts stays a descendant of
# pytest even when the process in between exits (a server whose launcher died, a daemon). When
# the session ends, a live descendant is a leak: it is listed with its command line, killed,
# and the session fails.

_PR_SET_CHILD_SUBREAPER = 36
_LEAK_GRACE_S = 10.0        # for processes that are on their way out (a server stopping)


def pytest_sessionstart(session: pytest.Session) -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass                                             # not Linux: no /proc check either


def _python_helpers() -> set[int]:
    """multiprocessing's resource tracker and forkserver: started once, they live as long as
    pytest by design (they exit when pytest closes their pipe)."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None)}
    return {pid for pid in pids if pid}


def _leaked_processes() -> dict[int, str]:
    from reduce_ops.processes import descendants

    helpers = _python_helpers()
    return {pid: start for pid, start in descendants(os.getpid()).items() if pid not in helpers}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    import signal
    import time

    from reduce_ops.processes import is_running

    if not Path("/proc/self/stat").exists():
        return
    deadline = time.monotonic() + _LEAK_GRACE_S
    leaked = _leaked_processes()
    while leaked and time.monotonic() < deadline:
        time.sleep(0.2)
        leaked = _leaked_processes()
    if not leaked:
        return
    lines = [f"{pid}: {_cmdline(pid)}" for pid in sorted(leaked)]
    for pid, start in leaked.items():
        if is_running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for pid in leaked:                                   # reap those that are our children
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter is not None else (lambda s: print(s, file=sys.stderr))
    write(f"\nFAILED: {len(lines)} process(es) started by the tests were still running at the "
          f"end (now killed):")
    for line in lines:
        write(f"  {line}")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

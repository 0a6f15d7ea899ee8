"""The local process pool (`execution.workers` > 1, the default `auto`): the same trials, chips
and groups as one worker at one torch thread, to the bit; a unit whose worker dies runs again;
a worker that keeps dying ends the stage in one line; `auto` is the core count."""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    THROUGH_GROUP,
    WAFER_FLEET,
    fat_and_compare,
    grid_trials,
    tiny_params,
    trained_chips,
)

from reduce_ops import config, execution, processes
from reduce_ops.config import ExecutionConfig, cores, from_dict
from reduce_ops.records import trials as trials_record

ONE = ExecutionConfig("local", None, 1, 1)       # in this process, one torch thread
POOL = ExecutionConfig("local", None, 2, 0)      # two worker processes, one thread each


def test_auto_workers_are_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = from_dict(tiny_params(["execution.workers=auto"]))
    assert cores() == len(os.sched_getaffinity(0))
    assert cfg.execution.workers == cores()            # this machine has memory to spare
    # at most one worker per GiB available
    monkeypatch.setattr(config, "cores", lambda: 64)
    real_open = open

    def meminfo(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if str(path) == "/proc/meminfo":
            return io.StringIO("MemTotal: 99999999 kB\nMemAvailable: 5767168 kB\n")  # 5.5 GiB
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", meminfo)
    assert config.auto_workers() == 5
    monkeypatch.setattr("builtins.open", real_open)
    # one worker from auto still runs each unit at one thread: the same results as a pool's
    monkeypatch.setattr(config, "auto_workers", lambda: 1)
    one = from_dict(tiny_params(["execution.workers=auto"])).execution
    assert (one.workers, one.torch_threads, execution.worker_threads(one)) == (1, 1, 1)
    assert execution.worker_threads(dataclasses.replace(cfg.execution, workers=2)) == 1
    assert execution.worker_threads(dataclasses.replace(cfg.execution, workers=1)) == 0
    with pytest.raises(Exception, match="execution.workers: expected an integer"):
        from_dict(tiny_params(["execution.workers=many"]))


GRID = ["resilience.fault_rates=[0.1, 0.3]", "resilience.repetitions=2",
        "resilience.max_epochs=0.5", "resilience.checkpoint_every=0.25"]


def test_the_pool_gives_the_trials_one_worker_gives(prepared_digits, one_torch_thread) -> None:
    one = grid_trials(prepared_digits, ONE, GRID)
    pool = grid_trials(prepared_digits, POOL, GRID)
    assert len(one) == 4
    for r in one:            # decisions read validation everywhere; test is the final model's
        assert all(0 < v <= 1 for v in r.val_accuracy) and 0 < r.test_accuracy[-1] <= 1
        assert all(v != v for v in r.test_accuracy[:-1]) and len(r.test_accuracy) > 1
    # every checkpoint's validation, the final model's test (NaN elsewhere): equal to the bit
    pd.testing.assert_frame_equal(trials_record.table(one), trials_record.table(pool))


def _die_once(marker: str, item: int) -> tuple[int, int]:
    """SIGKILLs its own worker process the first time it runs item 1."""
    if item == 1 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return item, os.getpid()


def _always_die(_shared: None, item: int) -> int:
    if item == 2:
        os._exit(3)
    return item


def test_a_unit_whose_worker_dies_runs_again(tmp_path: Path) -> None:
    marker = str(tmp_path / "died")
    got: dict[int, tuple[int, int]] = {}
    execution.map_unordered(_die_once, marker, [0, 1, 2, 3, 4], POOL,
                            lambda i, r: got.__setitem__(i, r))
    assert Path(marker).exists()                              # a worker did die once
    assert sorted(got) == [0, 1, 2, 3, 4] and all(got[i][0] == i for i in got)
    assert os.getpid() not in {pid for _, pid in got.values()}   # all ran in workers


def test_a_worker_that_keeps_dying_ends_in_one_line() -> None:
    got: dict[int, int] = {}
    with pytest.raises(execution.WorkerDiedError) as err:
        execution.map_unordered(_always_die, None, [0, 1, 2, 3], POOL,
                                lambda i, r: got.__setitem__(i, r))
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("execution.workers: a worker process died 4 times")
    assert 2 not in got                                       # the dying unit never returned


def test_fat_and_compare_in_the_pool_give_what_one_worker_gives(
        tmp_path: Path, tiny_pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-chip and per-group FAT with verification and compare's per-chip runs in a pool of two
    processes: the same chips, epochs and accuracies as one worker at one thread."""
    base = tiny_pipeline("wafer", WAFER_FLEET, THROUGH_GROUP)      # test_grouping's too
    out = {name: fat_and_compare(base, tmp_path / name, sets, monkeypatch) for name, sets in (
        ("one", ["execution.workers=1", "execution.torch_threads=1"]),
        ("pool", ["execution.workers=2", "execution.torch_threads=0"]))}
    chips = {n: trained_chips(r) for n, r in out.items()}
    assert (chips["one"]["group_size"] > 1).any()             # groups were trained too
    pd.testing.assert_frame_equal(chips["one"], chips["pool"])
    for name in ("per_chip.csv", "curves.csv"):
        assert ((out["one"] / "results/compare" / name).read_bytes()
                == (out["pool"] / "results/compare" / name).read_bytes())


def _note_pid_and_sleep(folder: str, item: int) -> int:
    Path(folder, f"{os.getpid()}").touch()
    time.sleep(120)
    return item


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill", "sigkill-driver"])
def test_stopping_the_driver_stops_its_workers(tmp_path: Path, how: str) -> None:
    """Ctrl-C (SIGINT to the foreground group) ends the driver at once, its workers killed;
    a SIGKILLed driver's workers end with it, and so does every other process it started (the
    fork server the workers come from), also when only the driver was killed: nothing keeps
    running."""
    script = ("import sys\n"
              f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from reduce_ops import execution\n"
              "from reduce_ops.config import ExecutionConfig\n"
              "import test_pool\n"
              "execution.map_unordered(test_pool._note_pid_and_sleep, sys.argv[1], [0, 1, 2, 3],"
              " ExecutionConfig('local', None, 2, 0), lambda i, r: None)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in tmp_path.iterdir()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        started = processes.descendants(proc.pid)          # pid -> start time
        assert set(workers) <= set(started)
        if how == "sigkill-driver":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(processes.is_running, started, started.values())) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid, at in started.items() if processes.is_running(pid, at)]
        assert proc.returncode == -(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid, at in started.items():       # whatever outlived a failed assertion
            if processes.is_running(pid, at):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("server", [False, True], ids=["spawned", "from-the-fork-server"])
def test_a_logger_process_whose_driver_died_while_it_started_ends(tmp_path: Path,
                                                                   server: bool) -> None:
    """A driver SIGKILLed while its logger process is still starting (importing MLflow and
    torch) must not leave that process behind: it would wait on its queue forever, holding the
    driver's stdout open (a `reduce-ops fat` killed early then never seems to end). Also where
    the logger is forked from the stage's fork server (not the driver's child)."""
    if server and execution.start_method() != "forkserver":
        pytest.skip("no fork server here")
    script = (
        "import os, signal, types\n"
        "from reduce_ops import execution\n"
        "from reduce_ops.config import ExecutionConfig\n"
        "from reduce_ops.tracking.logger import BackgroundTracking\n"
        + ("execution.start_pool_server(ExecutionConfig('local', None, 2, 1))\n" if server
           else "") +
        "stage = types.SimpleNamespace(uri='sqlite:///unused.db', run_id='r', experiment_id='0')\n"
        "BackgroundTracking(stage).start()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)      # returns once nothing holds its pipes
    assert proc.returncode == -9, proc.stderr


def _logger_parent(stage: object) -> int:
    return os.getppid()


@pytest.mark.skipif(execution.start_method() != "forkserver", reason="no fork server here")
def test_the_logger_of_a_pooled_stage_is_forked_from_its_fork_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fat`'s logging process comes from the fork server the stage started (torch and the
    stage's modules imported once, not again in a fresh interpreter); a stage without one
    spawns it, its own child."""
    import types
    from multiprocessing import forkserver

    from reduce_ops.tracking.logger import BackgroundTracking

    stage = types.SimpleNamespace(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", run_id="r",
                                  experiment_id="0")
    monkeypatch.setattr(execution, "_SERVER_STARTED", False)    # as a stage starts
    parents = []
    for started in (False, True):
        if started:
            execution.start_pool_server(POOL)
        queue = BackgroundTracking(stage).start()
        try:
            parents.append(queue.submit(_logger_parent, holds_model=False).result())
        finally:
            queue.close()
    assert parents == [os.getpid(), forkserver._forkserver._forkserver_pid]


def _where_am_i(shared: object, item: int) -> tuple[int, str, bool, bool]:
    return (os.getppid(), type(shared).__module__, "torch._dynamo" in sys.modules,
            all(m in sys.modules for m in execution.POOL_MODULES))


@pytest.mark.skipif(execution.start_method() != "forkserver", reason="no fork server here")
def test_workers_come_from_a_fork_server_that_imported_what_units_need(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers are forked from a server that imported torch, the optimizers' torch._dynamo
    and every unit's module once; a folder put on sys.path after it started (paths.code) is
    on the workers' too (multiprocessing sends the driver's sys.path with each new worker)."""
    # restored after the test: later tests' loggers start as their own stage would start them
    monkeypatch.setattr(execution, "_SERVER_STARTED", execution._SERVER_STARTED)
    execution.start_pool_server(POOL)
    (tmp_path / "late_user_code.py").write_text("class Thing:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import late_user_code

        got: dict[int, tuple] = {}
        execution.map_unordered(_where_am_i, late_user_code.Thing(), [0, 1, 2], POOL,
                                lambda i, r: got.__setitem__(i, r))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("late_user_code", None)
    assert sorted(got) == [0, 1, 2]
    assert all(r[0] != os.getpid() and r[1:] == ("late_user_code", True, True)
               for r in got.values())


def test_the_fork_server_imports_the_module_of_every_unit_a_pool_runs() -> None:
    """POOL_MODULES is every reduce_ops module that hands units to map_unordered."""
    root = Path(execution.__file__).parent
    callers = {".".join(("reduce_ops", *p.relative_to(root).with_suffix("").parts))
               for p in root.rglob("*.py") if "map_unordered(" in p.read_text()}
    assert callers - {"reduce_ops.execution"} == set(execution.POOL_MODULES)

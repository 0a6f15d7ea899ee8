"""Execution backends: Ray gives the trials local gives, retries a task whose worker died, and an
unreachable cluster is one line before any training."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    THROUGH_GROUP,
    WAFER_FLEET,
    fat_and_compare,
    grid_trials,
    make_project,
    trained_chips,
)

from reduce_ops import execution
from reduce_ops.cli import main
from reduce_ops.config import ExecutionConfig
from reduce_ops.records import trials as trials_record

ray = pytest.importorskip("ray", reason="Ray is installed by `make install` (requirements.txt)")


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) for the module; map_unordered joins it. Its workers can
    import this module (the task below is defined here)."""
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=execution.OBJECT_STORE_BYTES, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


GRID = ["resilience.fault_rates=[0.3]", "resilience.repetitions=3", "resilience.max_epochs=0.25",
        "resilience.checkpoint_every=0.25"]


def test_ray_gives_the_trials_local_gives(prepared_digits, ray_instance) -> None:
    local = grid_trials(prepared_digits, ExecutionConfig("local", None, 1, 1), GRID)
    remote = grid_trials(prepared_digits, ExecutionConfig("ray", None, 2, 1), GRID)
    # every checkpoint's validation, the final model's test (NaN elsewhere): equal to the bit
    pd.testing.assert_frame_equal(trials_record.table(local), trials_record.table(remote))


def _die_once(marker: str, item: int) -> tuple[int, int]:
    """Kills its own worker process the first time it runs item 1."""
    if item == 1 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return item, os.getpid()


def test_a_task_whose_worker_dies_is_retried(tmp_path: Path, ray_instance) -> None:
    marker = str(tmp_path / "died")
    got: dict[int, tuple[int, int]] = {}
    execution.map_unordered(_die_once, marker, [0, 1, 2, 3], ExecutionConfig("ray", None, 2, 1),
                            lambda i, r: got.__setitem__(i, r))
    assert Path(marker).exists()                              # the worker did die once
    assert sorted(got) == [0, 1, 2, 3] and all(got[i][0] == i for i in got)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_one_line_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_project(tmp_path / "p").parent
    port = _closed_port()
    code = main(["resilience", "--params", str(root / "params.yaml"),
                 "--set", "execution.backend=ray", "--set",
                 f"execution.address=ray://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "error: execution.address:" in err
    assert f"127.0.0.1:{port}" in err and "Traceback" not in err
    assert not (root / "results").exists()                   # nothing started, nothing written


def test_a_malformed_ray_address_names_the_key() -> None:
    with pytest.raises(Exception, match="execution.address: expected null, auto"):
        execution.check_address(ExecutionConfig("ray", "no-port-here", 2, 1))


def test_fat_and_compare_on_ray_give_what_local_gives(tmp_path: Path, ray_instance, tiny_pipeline,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-chip and per-group FAT with verification, and compare's per-chip runs, as Ray tasks:
    the same chips, epochs and accuracies as one after another in the driver."""
    base = tiny_pipeline("wafer", WAFER_FLEET, THROUGH_GROUP)      # test_grouping's too
    out = {backend: fat_and_compare(base, tmp_path / backend, [
        "execution.torch_threads=1", f"execution.backend={backend}",
        f"execution.workers={2 if backend == 'ray' else 1}"], monkeypatch)
        for backend in ("local", "ray")}
    chips = {b: trained_chips(r) for b, r in out.items()}
    assert (chips["local"]["group_size"] > 1).any()           # groups were trained too
    pd.testing.assert_frame_equal(chips["local"], chips["ray"])
    assert ((out["local"] / "results/compare/per_chip.csv").read_bytes()
            == (out["ray"] / "results/compare/per_chip.csv").read_bytes())

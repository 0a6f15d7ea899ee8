"""A stage process ends without tearing its modules down (reduce_ops.cli.exit_now), yet as
Python's own exit would: its threads finish, its atexit functions run, its output is flushed,
and its exit status is the stage's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib
from conftest import make_project

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from reduce_ops.cli import exit_now

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late():
    time.sleep(0.5)
    (out / "thread").write_text("finished")

threading.Thread(target=late).start()
sys.stdout.write("no newline, still buffered")
exit_now(3)
"""


def test_exit_now_finishes_threads_runs_atexit_and_flushes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}   # block-buffered
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False, env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "no newline, still buffered"
    assert (tmp_path / "thread").read_text() == "finished"
    assert (tmp_path / "atexit").read_text() == "ran"


def test_the_command_runs_a_stage_to_its_outputs_and_status(tmp_path: Path) -> None:
    """`python -m reduce_ops` and the console script both go through cli.run."""
    project = make_project(tmp_path / "project").parent
    proc = subprocess.run([sys.executable, "-m", "reduce_ops", "prepare", "--params",
                           str(project / "params.yaml")], cwd=project, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project / "data/prepared/dataset.npz").is_file()
    assert "prepared" in proc.stdout + proc.stderr
    bad = subprocess.run([sys.executable, "-m", "reduce_ops", "prepare", "--params",
                          str(project / "missing.yaml")], cwd=project, capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "prof"), "-m",
                               "reduce_ops", "source", "--params", str(project / "params.yaml")],
                              cwd=project, capture_output=True, text=True, timeout=300,
                              check=False)
    assert profiled.returncode == 0, profiled.stderr[-2000:]
    assert (tmp_path / "prof").stat().st_size > 0         # written at Python's own exit
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["reduce-ops"] == "reduce_ops.cli:run"

"""`reduce-ops ui` and the process tree it serves: however reduce-ops stops (Ctrl-C, SIGTERM,
SIGKILL, the server's own exit), no process of the server's tree is left; bad and busy ports
are one line and exit 2, before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    REPO,
    free_port,
    make_project,
    start_ui,
    tiny_params,
    wait_until_healthy,
)

from reduce_ops import processes
from reduce_ops.cli import main
from reduce_ops.errors import ServerExitError
from reduce_ops.processes import descendants, is_running, serve

# A server stand-in: a shell with two background children (a tree three levels deep).
TREE = ["sh", "-c", "sleep 600 & sleep 600 & wait"]
SERVE = "import sys; from reduce_ops.processes import serve; serve(sys.argv[1:], what='sh')"


def _running(tree: dict[int, str]) -> list[int]:
    return [pid for pid, start in tree.items() if is_running(pid, start)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:                       # ended meanwhile
        return b""


def _wait_until(condition, timeout: float) -> bool:   # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _tree_of(proc: subprocess.Popen, sleeps: int) -> dict[int, str]:
    """`proc`'s descendants once the shell's `sleeps` children run."""
    def started() -> bool:
        cmds = [_cmdline(pid) for pid in descendants(proc.pid)]
        return sum(cmd.startswith(b"sleep\0") for cmd in cmds) == sleeps
    assert _wait_until(started, 60), descendants(proc.pid)
    return descendants(proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_stopped_serve_leaves_no_process_of_its_tree(sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVE, *TREE], cwd=REPO,
                            stderr=subprocess.DEVNULL)
    tree = _tree_of(proc, sleeps=2)       # supervisor, sh, 2 x sleep
    assert len(tree) == 4
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=60)
    if sig == signal.SIGKILL:             # nobody waits: the supervisor ends the tree by itself
        assert _wait_until(lambda: not _running(tree), 30), _running(tree)
    else:                                 # serve returns (or raises) only once the tree is gone
        assert _running(tree) == []
        assert code == (143 if sig == signal.SIGTERM else -signal.SIGINT)   # KeyboardInterrupt


def _ignore_and_block_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # as a shell starts a background job
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_on_a_signal_its_starter_ignored_or_blocked(sig: signal.Signals) -> None:
    """Python installs no Ctrl-C handler over an inherited SIG_IGN, and a blocked mask is
    inherited through exec: serve and its supervisor take the stop signals back."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE, *TREE], cwd=REPO,
                            stderr=subprocess.DEVNULL, preexec_fn=_ignore_and_block_stop_signals)
    tree = _tree_of(proc, sleeps=2)
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=60)
    assert _running(tree) == []
    assert code in ((143,) if sig == signal.SIGTERM else (-signal.SIGINT, 130))


@pytest.mark.parametrize("code", [0, 3])
def test_a_server_that_exits_by_itself_is_an_error_and_leaves_nothing(code: int,
                                                                       tmp_path: Path) -> None:
    """Even with code 0: `mlflow ui` exits 0 when it cannot bind its port."""
    pidfile = tmp_path / "sleep.pid"
    with pytest.raises(ServerExitError, match=f"^sh exited by itself with code {code} "):
        serve(["sh", "-c", f"sleep 600 & echo $! > {pidfile}; exit {code}"], what="sh")
    assert not Path(f"/proc/{int(pidfile.read_text())}").exists()     # killed and reaped


def _params(tmp_path: Path) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    return params


@pytest.mark.parametrize("port", ["0", "-1", "65536", "99999"])
def test_ui_rejects_a_port_outside_1_to_65535(port: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["ui", "--params", str(_params(tmp_path)), f"--port={port}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and f"--port {port}:" in err and "65535" in err


def test_ui_reports_a_busy_port_before_starting_anything(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = set(descendants(os.getpid()))
        assert main(["ui", "--params", str(_params(tmp_path)), "--port", str(port)]) == 2
        assert set(descendants(os.getpid())) <= before
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and f"--port {port}:" in err and "already in use" in err


def test_ui_says_so_when_the_mlflow_server_exits_with_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]      # instead of `mlflow ui`
    real_serve = processes.serve
    monkeypatch.setattr(processes, "serve", lambda cmd, cwd, what: real_serve(crash, cwd, what))
    assert main(["ui", "--params", str(_params(tmp_path)), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err == "reduce-ops ui: error: the MLflow UI exited by itself with code 3 (its " \
                  "messages are above)\n"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stopped_by_a_signal_leaves_no_process_of_its_mlflow_server(
        sig: signal.Signals, tmp_path: Path) -> None:
    project = tmp_path / "project"
    make_project(project)
    port = free_port()
    log = tmp_path / "ui.stderr"
    proc = start_ui(project, port, log)
    try:
        assert f"http://127.0.0.1:{port}/#/experiments" in proc.stdout.readline()
        wait_until_healthy(proc, port, log)
        tree: dict[int, str] = {}
        for _ in range(10):                 # MLflow's job runner starts its workers meanwhile
            tree.update(descendants(proc.pid))
            time.sleep(0.3)
        cmds = b"".join(_cmdline(pid) for pid in _running(tree))
        assert b"uvicorn" in cmds and b"mlflow\0ui" in cmds
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _running(tree) == [], [_cmdline(pid) for pid in _running(tree)]
    if sig == signal.SIGINT:
        assert code == 130 and log.read_text().endswith("reduce-ops ui: interrupted\n")
    else:
        assert code == 143

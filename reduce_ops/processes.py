"""Run a server as a process tree that never outlives this process: stopped with all its
descendants on Ctrl-C, on SIGTERM/SIGHUP, when it ends by itself, and when this process dies.

How (Linux): the server runs under a small supervisor, `python -m reduce_ops.processes`, in a
session of its own (so a terminal's Ctrl-C reaches only reduce-ops, which then stops it in
order). The supervisor
- asks for SIGTERM when reduce-ops dies, even by SIGKILL (prctl PR_SET_PDEATHSIG, set in the
  supervisor itself rather than through Popen's preexec_fn, which is unsafe once threads run);
- is a child subreaper (PR_SET_CHILD_SUBREAPER), so whatever the server starts stays its
  descendant even after the middle process exits (MLflow's uvicorn and huey workers);
- on SIGTERM, or when the server exits, sends SIGTERM to every descendant (found in /proc),
  then SIGKILL to those left after a grace period, and exits once none is left.
Without /proc (macOS) it signals its process group instead: descendants that start sessions of
their own escape it there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from reduce_ops.errors import ServerExitError

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 10.0          # from SIGTERM to SIGKILL, for the tree's processes to exit cleanly
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve(cmd: Sequence[str], cwd: Path | None = None, what: str = "the server") -> NoReturn:
    """Run the server `cmd` until this process is stopped: KeyboardInterrupt on Ctrl-C,
    SystemExit(128 + signal) on SIGTERM/SIGHUP; its whole process tree is stopped first. A
    server that exits by itself raises ServerExitError naming `what`, whatever its exit code
    (`mlflow ui` exits 0 when its port is taken)."""
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "reduce_ops.processes", str(os.getpid()), "--", *cmd],
        cwd=cwd, start_new_session=True)
    with _signals_exit():
        try:
            code = supervisor.wait()
        finally:
            _stop(supervisor)
    raise ServerExitError(f"{what} exited by itself with code {code} (its messages are above)")


def _stop(supervisor: subprocess.Popen) -> None:
    """SIGTERM the supervisor (it stops the tree) and wait; SIGKILL its process group if it
    hangs. The supervisor is not reaped before killpg, so its group id cannot be reused."""
    if supervisor.poll() is not None:
        return
    supervisor.send_signal(signal.SIGTERM)
    try:
        supervisor.wait(timeout=GRACE_S + 10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(supervisor.pid, signal.SIGKILL)
        supervisor.wait()


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) for the block, so `finally` runs (by
    default they would end Python at once), and Ctrl-C raises KeyboardInterrupt even where this
    process was started with SIGINT ignored or the stop signals blocked (both are inherited from
    whatever started it, and Python installs no Ctrl-C handler over an ignored SIGINT). Only
    the main thread may set handlers."""
    if sys.platform == "win32" or not _in_main_thread():
        yield
        return

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    before = {sig: signal.signal(sig, _exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    before[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def descendants(pid: int) -> dict[int, str]:
    """Live (not zombie) descendants of `pid`, from /proc (Linux): pid -> start time in clock
    ticks since boot, which tells the process from a later one that reuses its pid."""
    children: dict[int, list[int]] = {}
    info: dict[int, tuple[str, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue                                   # ended meanwhile
        child = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(child)     # fields[1]: ppid
        info[child] = (fields[0], fields[19])                      # state, start time
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        state, start = info[child]
        if state not in ("Z", "X"):
            found[child] = start
        todo += children.get(child, [])
    return found


def is_running(pid: int, start: str) -> bool:
    """Whether the process `pid` that started at `start` (see `descendants`) still runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] not in ("Z", "X")


# --- the supervisor process -------------------------------------------------------------------

class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _prctl(option: int, value: int) -> bool:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):                 # not Linux
        return False


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when the process that started it (pid `parent`) dies,
    so a helper process (a logger, a pool worker) never outlives a driver that was SIGKILLed
    (it would race the rerun's registrations, or wait on its queue forever). A driver that
    died before this ran (while the process was starting) is no longer its parent: then it
    ends at once."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def die_with_driver(driver: int) -> None:
    """Linux >= 5.3: this process ends the moment process `driver` ends, even by SIGKILL, where
    that is not its parent (a pool worker forked by a fork server, which die_with_parent cannot
    tie to the driver): a thread waits on the driver's pidfd. A driver gone already ends it at
    once."""
    import select
    import threading

    try:
        fd = os.pidfd_open(driver)
    except ProcessLookupError:
        os._exit(1)

    def wait() -> None:
        ended = select.poll()          # poll, not select: any descriptor number
        ended.register(fd, select.POLLIN)
        while not ended.poll():
            pass
        os._exit(1)

    threading.Thread(target=wait, name="die-with-driver", daemon=True).start()


def die_with_starter(driver: int, method: str) -> None:
    """Tie a helper process (a pool worker, a logger) started by `method` to its driver: one
    forked by the fork server is not the driver's child and watches its pidfd
    (die_with_driver), one spawned or forked by the driver itself is (die_with_parent)."""
    if method == "forkserver":
        die_with_driver(driver)
    else:
        die_with_parent(driver)


def _end_tree(grace: float, group: int | None) -> None:
    """SIGTERM every descendant, SIGKILL those left after `grace` s; reap; return when none is
    left. New descendants started meanwhile get the same treatment. Without /proc: the server's
    process group `group` instead."""
    deadline = time.monotonic() + grace
    if not Path("/proc/self/stat").exists():
        if group is not None:
            for sig, until in ((signal.SIGTERM, deadline), (signal.SIGKILL, deadline + 5)):
                with contextlib.suppress(OSError):
                    os.killpg(group, sig)
                while _reap() and time.monotonic() < until:
                    time.sleep(0.1)
        return
    signalled: set[tuple[int, str]] = set()
    while True:
        _reap()
        alive = descendants(os.getpid())
        if not alive:
            return
        late = time.monotonic() >= deadline
        for pid, start in alive.items():
            if late or (pid, start) not in signalled:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                signalled.add((pid, start))
        time.sleep(0.1)


def _reap() -> bool:
    """Collect every exited child (our own and orphans handed to us as subreaper); False when
    no child is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def supervise(parent: int, cmd: Sequence[str]) -> int:
    """Run `cmd`; stop its whole tree when it exits, on SIGTERM/SIGINT/SIGHUP, or when `parent`
    dies. Returns the server's exit code (128 + signal if it was killed), 128 + the signal that
    stopped us, or 1 if `parent` was already gone."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:                        # died before prctl: no signal will come
        return 1
    _prctl(PR_SET_CHILD_SUBREAPER, 1)

    def _stop(signum: int, _frame: object) -> None:
        raise _Stopped(signum)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, _stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)     # a blocked mask is inherited
    server = None
    try:
        server = subprocess.Popen(list(cmd), start_new_session=True)   # its group: see _end_tree
        while True:                                   # our orphans are reaped here too
            pid, status = os.wait()
            if pid == server.pid:
                code = os.waitstatus_to_exitcode(status)
                server.returncode = code
                code = 128 - code if code < 0 else code
                break
    except _Stopped as stopped:
        code = 128 + stopped.signum
    except OSError as exc:                            # the command could not start
        print(f"reduce-ops: cannot start {cmd[0]}: {exc}", file=sys.stderr)
        code = 127
    finally:
        for sig in _STOP_SIGNALS:                     # nothing interrupts the clean-up
            signal.signal(sig, signal.SIG_IGN)
        _end_tree(GRACE_S, server.pid if server is not None else None)
    return code


def main(argv: Sequence[str]) -> int:
    """`python -m reduce_ops.processes PARENT_PID -- CMD...` (started by `serve`)."""
    parent, sep, *cmd = argv
    if sep != "--" or not cmd:
        raise SystemExit("usage: python -m reduce_ops.processes PARENT_PID -- CMD...")
    return supervise(int(parent), cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Which process owns a run (host:pid:start), and whether that process is gone: how a stage
tells a run abandoned by a SIGKILLed or out-of-memory process from one still running."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" when unknown; with the
    pid it tells a live owner from a new process that reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def driver_token(pid: int | None = None) -> str:
    """host:pid:start of this (or another) process, tagged on every stage run."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{start_ticks(pid)}"


def owner_gone(token: str) -> bool:
    """True when the process that tagged a run `token` is known to be dead: it ran on this
    host and no process with its pid and start time exists. Runs of other hosts are never
    judged (their owner may be alive)."""
    host, _, rest = token.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(ticks) and start_ticks(pid) != ticks

"""Progress of long work: a live tqdm bar on a terminal, plain lines in a log.

Off a terminal (DVC's log, CI, a file) a bar's carriage-return updates pile up into one unreadable
line, so there every finished unit prints one line of its own, and a long unit prints a line from
inside it (at most every `heartbeat` seconds) so that minutes-long trials still show they move.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

HEARTBEAT_SECONDS = 30.0


class Progress:
    """Progress over `total` units of work (trials, chips, epochs), reported to `stream`."""

    def __init__(self, total: int, desc: str, unit: str, stream: TextIO | None = None,
                 tty: bool | None = None, heartbeat: float = HEARTBEAT_SECONDS) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.heartbeat = heartbeat
        self.count = 0
        self._t0 = self._unit_t0 = self._last_line = time.perf_counter()
        self._bar: Any = None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, mininterval=0.5)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def start(self, label: str) -> None:
        """A unit begins (shown on the bar; off a terminal only its heartbeat lines show it)."""
        self._unit_t0 = time.perf_counter()
        self._label = label
        if self._bar is not None:
            self._bar.set_postfix_str(label)

    def inside(self, text: str) -> None:
        """Where the current unit is (e.g. '1.25/4 epochs, val 0.962')."""
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.set_postfix_str(f"{getattr(self, '_label', '')} {text}".strip())
        elif now - self._last_line >= self.heartbeat:
            self._line(f"{getattr(self, '_label', '')} {text} "
                       f"({now - self._unit_t0:.0f} s)".strip())

    def done(self, label: str, text: str = "", seconds: float | None = None) -> None:
        """A unit finished: advance the bar, or print one line with its time: `seconds` where
        the caller knows the unit's own (units in worker processes run side by side), else the
        time since the last unit started or finished here."""
        self.count += 1
        if self._bar is not None:
            self._bar.update(1)
            return
        took = seconds if seconds is not None else time.perf_counter() - self._unit_t0
        self._line(f"{self.count}/{self.total} {label}" + (f": {text}" if text else "")
                   + f" ({took:.1f} s)")
        self._unit_t0 = time.perf_counter()

    def note(self, line: str) -> None:
        """A message that must not be lost under the bar (a warning, a skipped unit)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self._line(line)

    def _line(self, text: str) -> None:
        self.stream.write(f"{self.desc}: {text}\n")
        self.stream.flush()
        self._last_line = time.perf_counter()

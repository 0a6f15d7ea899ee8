"""Progress off a terminal: one plain line per finished unit, heartbeat lines inside long units,
and never a carriage return (which DVC's and CI's logs would pile into one unreadable line)."""

from __future__ import annotations

import io

from reduce_ops.progress import Progress


def test_off_a_terminal_every_unit_is_one_line() -> None:
    out = io.StringIO()
    with Progress(3, "resilience", "trial", stream=out) as progress:
        for i in range(3):
            progress.start(f"trial {i}")
            progress.inside("0.25/4 epochs")          # within the heartbeat: not printed
            progress.done(f"trial {i}", f"val 0.9{i}")
        progress.note("trial 9 skipped")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" (")[0] for line in lines] == [
        "resilience: 1/3 trial 0: val 0.90", "resilience: 2/3 trial 1: val 0.91",
        "resilience: 3/3 trial 2: val 0.92", "resilience: trial 9 skipped"]
    assert all(line.endswith(" s)") for line in lines[:3])        # each unit's duration


def test_units_run_side_by_side_show_their_own_time() -> None:
    """In a pool, units finish close together: each line shows the unit's own time."""
    out = io.StringIO()
    with Progress(2, "compare", "chip", stream=out) as progress:
        progress.done("chip chip-000", "trained to 5.00 epochs", 3.64)
        progress.done("chip chip-001", "trained to 5.00 epochs", 3.58)
    assert out.getvalue().splitlines() == [
        "compare: 1/2 chip chip-000: trained to 5.00 epochs (3.6 s)",
        "compare: 2/2 chip chip-001: trained to 5.00 epochs (3.6 s)"]


def test_a_long_unit_reports_from_inside_it() -> None:
    out = io.StringIO()
    progress = Progress(1, "resilience", "trial", stream=out, heartbeat=0.0)
    progress.start("trial r0.2-rep1")
    progress.inside("1.25/4 epochs, val 0.962")
    progress.inside("1.5/4 epochs, val 0.964")
    progress.done("trial r0.2-rep1")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("resilience: trial r0.2-rep1 1.25/4 epochs, val 0.962 (")
    assert lines[1].startswith("resilience: trial r0.2-rep1 1.5/4 epochs")
    assert lines[2].startswith("resilience: 1/1 trial r0.2-rep1 (")


def test_on_a_terminal_it_is_a_live_bar() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    with Progress(2, "fat", "chip", stream=out) as progress:
        progress.start("chip chip-000")
        progress.done("chip chip-000")
        progress.done("chip chip-001")
    assert "\r" in out.getvalue() and "2/2" in out.getvalue()

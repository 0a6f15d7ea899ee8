"""`python -m reduce_ops` is the `reduce-ops` command (used by MLproject entry points)."""

from reduce_ops.cli import run

run()

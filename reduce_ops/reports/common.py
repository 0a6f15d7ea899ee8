"""What every figure shares: labels, colours, checking a table, writing a PNG atomically;
markdown tables (a run's description in the MLflow UI)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from reduce_ops.atomic import write_file
from reduce_ops.errors import DataError

DPI = 150
RATE_LABEL = "fault rate (fraction of faulty PEs)"
EPOCHS_LABEL = "retraining needed (epochs of FAT)"
POLICY_COLORS = ["C1", "C2", "C4", "C5", "C6", "C9", "C8", "C7"]
TOP = 1.12  # y limit of the epoch axes as a multiple of max_amount; the top band holds "never"


def save_figure(fig: Figure, path) -> Path:
    """Write `fig` as a PNG atomically (readers never see a half-written file)."""
    return write_file(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


def require(df: pd.DataFrame, columns, what: str) -> None:
    """Fail with one line naming the table and the missing columns."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise DataError(f"{what}: no rows")


def fmt(x: float) -> str:
    """Short number for labels: 0.25, 1, 4."""
    return f"{x:g}"


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], limit: int = 40,
             more: str = "") -> str:
    """A markdown table (the run page renders it); past `limit` rows one line says how many
    more there are and where (`more`)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, columns)) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n{len(rows) - limit} more rows{f' in {more}' if more else ''}.")
    return "\n".join(lines)

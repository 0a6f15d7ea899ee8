"""The baseline record that `pretrain` hands every later stage: the baseline's accuracies on the
decision and report splits, measured once, and which model file and dataset they are for."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reduce_ops import atomic
from reduce_ops.errors import DataError
from reduce_ops.names import TEST_ACCURACY, VAL_ACCURACY
from reduce_ops.provenance import file_sha256

FILE = "metrics.json"


def path(results: Path) -> Path:
    """Where pretrain writes the record under paths.results."""
    return results / "pretrain" / FILE


@dataclass(frozen=True)
class BaselineRecord:
    """What pretrain measured on the baseline it saved."""

    val_accuracy: float        # decision split
    test_accuracy: float       # report split
    baseline_hash: str         # sha256 of the model file
    dataset_hash: str


def write(path: Path, metrics: dict[str, Any], baseline_file: Path, dataset_hash: str,
          model: str) -> None:
    """metrics.json: every measure of the baseline, and the file and data it is for."""
    atomic.write_json(path, {**metrics, "dataset_hash": dataset_hash, "model": model,
                             "baseline_hash": file_sha256(baseline_file)})


def read(path: Path, baseline_file: Path) -> BaselineRecord:
    """The record, checked against the baseline file there now; one line when it is missing,
    broken, or was written for another model file."""
    remedy = "run `reduce-ops pretrain` again"
    if not path.is_file():
        raise DataError(f"{path}: no baseline record; {remedy}")
    try:
        d = json.loads(path.read_text())
        record = BaselineRecord(float(d[VAL_ACCURACY]), float(d[TEST_ACCURACY]),
                                str(d["baseline_hash"]), str(d["dataset_hash"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: unreadable baseline record ({type(exc).__name__}: {exc}); "
                        f"{remedy}") from None
    if not baseline_file.is_file():
        raise DataError(f"{baseline_file}: no baseline model; run `reduce-ops pretrain` first")
    if file_sha256(baseline_file) != record.baseline_hash:
        raise DataError(f"{path} was measured on another model than {baseline_file}; {remedy}")
    return record

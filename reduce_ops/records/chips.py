"""The chip outcomes record that `fat` writes (chips.csv and summary.json) and keeps on every
registered model version as tags, so that a rerun rebuilds the outcome of a chip registered
before from its version alone."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reduce_ops import atomic, names
from reduce_ops.names import CHAMPION, REJECTED, SHIPPED
from reduce_ops.records import sets

CHIPS_FILE, SUMMARY_FILE = "chips.csv", "summary.json"


def directory(results: Path) -> Path:
    """Where the fat stage writes its record under paths.results."""
    return results / "fat"


@dataclass
class ChipOutcome:
    """One row of chips.csv."""

    chip_id: str
    fault_rate: float
    planned_epochs: float      # of the FAT run that served the chip; NaN: rejected by the plan
    status: str = ""           # shipped (verified on validation) | rejected
    reason: str = ""           # why a chip was rejected
    actual_epochs: float = 0.0  # of that run: planned + extensions (the cap when it never passed)
    n_checks: int = 0          # validation checks (1 = passed at the planned amount)
    val_accuracy: float = math.nan
    test_accuracy: float = math.nan      # reported only: nothing is decided on it
    test_ci_low: float = math.nan
    test_ci_high: float = math.nan
    meets_on_test: bool = False          # test accuracy >= the constraint level on test
    pruned_fraction: float = math.nan
    model_version: str = ""
    champion_version: str = ""
    run_id: str = ""
    trained: bool = False      # False: rejected by the plan, or registered for it already
    group_id: str = ""         # eFAT group whose fused map the model was trained for
    group_size: int = 1        # chips sharing that run (its epochs count once for all)
    failed_group_epochs: float = 0.0   # share of an eFAT group run that missed at the cap
    serialization_format: str = ""
    train_seconds: float = 0.0
    log_model_seconds: float = 0.0


CHIP_COLUMNS = tuple(f.name for f in fields(ChipOutcome))

# Outcome fields kept as version tags ({field: tag}); `status` is the `verified` tag, the
# version, champion and run come from the version itself, timings are not kept.
_TAGS = {"chip_id": names.VTAG_CHIP, "fault_rate": names.VTAG_FAULT_RATE,
         "planned_epochs": names.VTAG_PLANNED_EPOCHS, "actual_epochs": names.VTAG_ACTUAL_EPOCHS,
         "n_checks": names.VTAG_N_CHECKS, "reason": names.VTAG_REASON,
         "test_accuracy": names.VTAG_TEST_ACCURACY, "test_ci_low": "test_ci_low",
         "test_ci_high": "test_ci_high", "val_accuracy": names.VTAG_VAL_ACCURACY,
         "pruned_fraction": names.VTAG_PRUNED_FRACTION,
         "meets_on_test": names.VTAG_CONSTRAINT_MET,
         "serialization_format": names.VTAG_SERIALIZATION, "group_size": names.VTAG_GROUP_SIZE,
         "group_id": names.VTAG_GROUP, "failed_group_epochs": names.VTAG_FAILED_GROUP_EPOCHS}
_ONLY_WHEN_SET = ("group_id", "failed_group_epochs")    # absent for a chip trained alone


def _tag_text(value: Any) -> str:
    return str(bool(value)).lower() if isinstance(value, (bool, np.bool_)) else str(value)


def version_tags(o: ChipOutcome, context: Mapping[str, Any]) -> dict[str, str]:
    """The tags of the model version registered for outcome `o`, with `context` (the plan,
    its levels, the fused map...) beside them."""
    tags = {tag: _tag_text(getattr(o, f)) for f, tag in _TAGS.items()
            if f not in _ONLY_WHEN_SET or getattr(o, f)}
    # what people read: 4 digits (the exact rate is the plan's, and the run's param)
    tags[names.VTAG_FAULT_RATE] = f"{o.fault_rate:.4f}"
    tags[names.VTAG_VERIFIED] = _tag_text(o.status == SHIPPED)
    return {**tags, **{k: _tag_text(v) for k, v in context.items()}}


def from_version(tags: Mapping[str, str], version: str, aliases: Sequence[str],
                 run_id: str) -> ChipOutcome:
    """The outcome a registered version records (it was not trained by this run)."""
    kinds = {f.name: f.type for f in fields(ChipOutcome)}
    values: dict[str, Any] = {}
    for f, tag in _TAGS.items():
        text = tags.get(tag)
        kind = kinds[f]
        if kind == "str":
            values[f] = text or ""
        elif kind == "bool":
            values[f] = text == "true"
        elif kind == "int":
            values[f] = int(float(text)) if text else (1 if f == "group_size" else 0)
        elif f == "failed_group_epochs":
            values[f] = float(text) if text else 0.0
        else:
            values[f] = float(text) if text else math.nan
    champion = version if CHAMPION in aliases else ""
    return ChipOutcome(**values, status=SHIPPED if tags.get(names.VTAG_VERIFIED) == "true"
                       else REJECTED, model_version=version, champion_version=champion,
                       run_id=run_id, trained=False)


def table(outcomes: Sequence[ChipOutcome]) -> pd.DataFrame:
    """chips.csv: one row per chip in plan order."""
    return pd.DataFrame([asdict(o) for o in outcomes], columns=list(CHIP_COLUMNS))


def summarize(outcomes: Sequence[ChipOutcome], plan_run_id: str, decision_level: float,
              constraint_level: float, budget_cap: float) -> dict[str, Any]:
    """Chips shipped and rejected, how many shipped chips meet the constraint on test, epochs
    planned and trained (a group's run counted once), and the plan's error (actual - planned
    epochs) over the runs it planned."""
    planned = [o for o in outcomes if not math.isnan(o.planned_epochs)]
    shipped = [o for o in outcomes if o.status == SHIPPED]
    trained = [o for o in outcomes if o.trained]
    share = np.array([1.0 / o.group_size for o in planned])          # of each chip's run
    errors = np.array([o.actual_epochs - o.planned_epochs for o in planned])
    log_s = sum(o.log_model_seconds for o in trained)

    def epochs(chips: Sequence[ChipOutcome], key: str) -> float:
        return float(sum(getattr(o, key) / o.group_size for o in chips))

    failed = float(sum(o.failed_group_epochs for o in planned))
    return {
        "plan_run_id": plan_run_id, "decision_level": decision_level,
        "constraint_level": constraint_level, "budget_cap": budget_cap,
        "n_chips": len(outcomes), "n_planned": len(planned), "n_shipped": len(shipped),
        "n_rejected_by_plan": len(outcomes) - len(planned),
        "n_rejected_at_cap": len(planned) - len(shipped),
        "n_meet_on_test": sum(o.meets_on_test for o in shipped),
        "shipped_meet_rate": (sum(o.meets_on_test for o in shipped) / len(shipped)
                              if shipped else math.nan),
        "n_fat_runs": int(round(share.sum())), "n_grouped_chips": sum(o.group_size > 1
                                                                       for o in planned),
        "total_planned_epochs": epochs(planned, "planned_epochs"),
        "total_epochs": epochs(planned, "actual_epochs") + failed,
        "failed_group_epochs": failed,
        "plan_error_mean": float((errors * share).sum() / share.sum()) if errors.size else 0.0,
        "plan_error_mean_abs": (float((np.abs(errors) * share).sum() / share.sum())
                                if errors.size else 0.0),
        "n_extended": int(round(sum(s for o, s in zip(planned, share) if o.n_checks > 1))),
        "n_trained": len(trained), "n_skipped": len(planned) - len(trained),
        "trained_epochs": epochs(trained, "actual_epochs"),
        "train_seconds": sum(o.train_seconds for o in trained),
        "log_model_seconds": log_s,
        "log_model_seconds_per_chip": log_s / len(trained) if trained else 0.0,
        "shipped_missing_on_test": [o.chip_id for o in shipped if not o.meets_on_test],
        "rejected": [o.chip_id for o in outcomes if o.status == REJECTED],
    }


def write(out_dir: Path, outcomes: Sequence[ChipOutcome], summary: Mapping[str, Any]) -> None:
    """chips.csv and summary.json (with chips.csv's sha256), replacing the old record at once."""
    with sets.record_dir(out_dir, "fat", CHIPS_FILE, SUMMARY_FILE) as tmp:
        atomic.write_csv(table(outcomes), tmp / CHIPS_FILE)
        atomic.write_json(tmp / SUMMARY_FILE,
                          {**summary, sets.FILES_KEY: sets.digests(tmp, CHIPS_FILE)})

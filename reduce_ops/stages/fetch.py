"""`reduce-ops fetch CHIP_ID`: show a chip's champion model; with an output folder, download it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from reduce_ops import names, registry
from reduce_ops.config import Config
from reduce_ops.errors import ReduceOpsError, TrackingError
from reduce_ops.records import plan as plan_record
from reduce_ops.tracking.registry import ModelVersionInfo
from reduce_ops.tracking.store import tracking_uri


def _not_in_plan(cfg: Config, chip_id: str) -> None:
    """One line when this project's current plan does not hold the chip (a smaller or another
    fleet): what the registry says of it belongs to an earlier fleet."""
    plan_dir = plan_record.directory(cfg.path("results"))
    try:
        chips = set(plan_record.read(plan_dir).chips["chip_id"])
    except ReduceOpsError:
        return
    if chip_id not in chips:
        raise TrackingError(f"chip {chip_id!r} is not in the fleet of the current plan "
                            f"({plan_dir}, {len(chips)} chips)")


def _note_other_plan(cfg: Config, chip_id: str, mv: ModelVersionInfo) -> None:
    """A note on stderr when the champion was trained for another plan than this project's
    current one (results/plan): `fat` has not run since, or the chip is not in the plan."""
    summary = plan_record.directory(cfg.path("results")) / plan_record.SUMMARY_FILE
    try:
        current = str(json.loads(summary.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return                                   # no plan here (fetch works from any folder)
    trained_for = mv.tags.get(names.VTAG_PLAN_RUN, "")
    if trained_for and trained_for != current:
        print(f"reduce-ops fetch: note: {chip_id}'s champion was trained for plan "
              f"{trained_for}, the current plan ({summary.parent}) is {current}: run "
              f"`reduce-ops fat` to serve the current plan's model", file=sys.stderr)


def run(cfg: Config, chip_id: str, out: Path | None = None) -> ModelVersionInfo:
    """Print the champion's URI, version and accuracy; download it into `out` when given."""
    uri = tracking_uri(cfg.root)
    problem = names.safe_name_problem(chip_id)
    if problem:
        raise TrackingError(f"chip id: {problem}")
    try:
        mv = registry.champion(uri, chip_id, cfg.registry.prefix)
    except TrackingError:
        _not_in_plan(cfg, chip_id)        # the reason that matters here, when it is this one
        raise
    tags = mv.tags
    print(f"{chip_id}: models:/{mv.name}@{names.CHAMPION} = version {mv.version}; verified at "
          f"validation accuracy {float(tags.get(names.VTAG_VAL_ACCURACY, 'nan')):.4f} (level "
          f"{float(tags.get(names.VTAG_DECISION_LEVEL, 'nan')):.4f}); test accuracy "
          f"{float(tags.get(names.VTAG_TEST_ACCURACY, 'nan')):.4f} (constraint "
          f"{float(tags.get(names.VTAG_CONSTRAINT_LEVEL, 'nan')):.4f}); fault rate "
          f"{float(tags.get(names.VTAG_FAULT_RATE, 'nan')):.4f}, "
          f"{tags.get(names.VTAG_ACTUAL_EPOCHS, '?')} epochs of FAT (planned "
          f"{tags.get(names.VTAG_PLANNED_EPOCHS, '?')}), "
          f"{tags.get(names.VTAG_SERIALIZATION, '?')} model; run {mv.run_id}")
    _note_other_plan(cfg, chip_id, mv)
    if out is not None:
        folder = registry.download_champion(uri, mv, Path(out))
        print(f"downloaded -> {folder}/model (MLflow model) and {folder}/{names.CHIP_MODEL_FILE} "
              f"(state_dict + arch)")
    return mv

"""`reduce-ops fetch CHIP_ID`: show a chip's champion model; with an output folder, download it."""

from __future__ import annotations

from pathlib import Path

from reduce_ops import names, registry
from reduce_ops.config import Config
from reduce_ops.tracking.registry import ModelVersionInfo
from reduce_ops.tracking.store import tracking_uri


def run(cfg: Config, chip_id: str, out: Path | None = None) -> ModelVersionInfo:
    """Print the champion's URI, version and accuracy; download it into `out` when given."""
    uri = tracking_uri(cfg.root)
    mv = registry.champion(uri, chip_id, cfg.registry.prefix)
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
    if out is not None:
        folder = registry.download_champion(uri, mv, Path(out))
        print(f"downloaded -> {folder}/model (MLflow model) and {folder}/{names.CHIP_MODEL_FILE} "
              f"(state_dict + arch)")
    return mv

"""Systolic-array fault model: geometry, weight -> PE mapping, fault maps and fleets on disk."""

from reduce_ops.hardware.faultmap import (
    GENERATORS,
    RATE_DISTRIBUTIONS,
    FaultMap,
    chip_ids,
    clustered_fault_map,
    generate_fleet,
    sample_fleet_rates,
    uniform_fault_map,
    validate_chip_id,
    wafer_fleet,
)
from reduce_ops.hardware.fleetio import (
    MANIFEST,
    import_fault_maps,
    load_fleet,
    read_fault_map_file,
    write_fleet,
)
from reduce_ops.hardware.geometry import ArrayGeometry

# Weights onto PEs (torch) is imported when one of its names is first used: a stage that only
# reads or writes fault maps (faultmaps, plan) does not import torch for it.
_MAPPING = ("LAYER_TYPES", "MaskedWeights", "apply_masks", "build_masks", "layer_keep_mask",
            "leave_off_array", "mapped_layers", "pruned_fraction", "unmapped_layers")


def __getattr__(name: str) -> object:
    if name in _MAPPING:
        from reduce_ops.hardware import mapping

        return getattr(mapping, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "GENERATORS",
    "LAYER_TYPES",
    "MANIFEST",
    "MaskedWeights",
    "RATE_DISTRIBUTIONS",
    "ArrayGeometry",
    "FaultMap",
    "apply_masks",
    "build_masks",
    "chip_ids",
    "clustered_fault_map",
    "generate_fleet",
    "import_fault_maps",
    "layer_keep_mask",
    "leave_off_array",
    "load_fleet",
    "mapped_layers",
    "pruned_fraction",
    "read_fault_map_file",
    "sample_fleet_rates",
    "uniform_fault_map",
    "unmapped_layers",
    "validate_chip_id",
    "wafer_fleet",
    "write_fleet",
]

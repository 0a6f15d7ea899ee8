"""`reduce-ops faultmaps`: the fleet's fault maps, generated from params or imported."""

from __future__ import annotations

import os
from pathlib import Path

from reduce_ops.config import Config, set_params
from reduce_ops.hardware import (ArrayGeometry, FaultMap, generate_fleet, import_fault_maps,
                                 wafer_fleet, write_fleet)


def _source_dir(cfg: Config) -> Path:
    folder = Path(cfg.faultmaps.import_dir)
    return folder if folder.is_absolute() else cfg.root / folder


def run(cfg: Config) -> list[FaultMap]:
    """Write paths.fleet: faultmaps.import_dir's maps (source: import) or a generated fleet."""
    geometry = ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols)
    fm = cfg.faultmaps
    if fm.source == "import":
        maps = import_fault_maps(_source_dir(cfg), geometry)
        how = f"imported from {fm.import_dir}"
    elif fm.generator == "wafer":
        maps = wafer_fleet(fm.n_chips, geometry, fm.chips_per_wafer, fm.shared_fraction,
                           fm.rate_distribution, fm.rate_min, fm.rate_max, fm.seed, fm.id_prefix)
        how = (f"{fm.n_chips // fm.chips_per_wafer} wafers of {fm.chips_per_wafer} chips sharing "
               f"{fm.shared_fraction:.0%} of their defects, rates {fm.rate_distribution} in "
               f"[{fm.rate_min:g}, {fm.rate_max:g}]")
    else:
        maps = generate_fleet(fm.n_chips, geometry, fm.generator, fm.rate_distribution,
                              fm.rate_min, fm.rate_max, fm.seed, id_prefix=fm.id_prefix)
        how = (f"{fm.generator} defects, rates {fm.rate_distribution} in "
               f"[{fm.rate_min:g}, {fm.rate_max:g}]")
    return _write(cfg, maps, how)


def _write(cfg: Config, maps: list[FaultMap], how: str) -> list[FaultMap]:
    out = cfg.path("fleet")
    write_fleet(maps, out)
    rates = [m.fault_rate for m in maps]
    print(f"fleet of {len(maps)} chips on a {cfg.hardware.rows}x{cfg.hardware.cols} array "
          f"({how}); fault rate {min(rates):.3f}..{max(rates):.3f} -> {out}")
    return maps


def import_maps(cfg: Config, params_file: Path, src: Path) -> list[FaultMap]:
    """Import a test floor's maps from `src` and record it in the params file
    (faultmaps.source: import, faultmaps.import_dir: src), so `dvc repro` keeps this fleet
    and re-imports it when its files change instead of generating one over it."""
    # every map is checked before anything is written
    maps = import_fault_maps(src, ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols))
    src = src.resolve()
    folder = os.path.relpath(src, cfg.root) if src.is_relative_to(cfg.root) else str(src)
    set_params(params_file, {"faultmaps.source": "import", "faultmaps.import_dir": folder})
    print(f"{params_file.name}: faultmaps.source = import, faultmaps.import_dir = {folder} "
          f"(dvc repro re-imports it)")
    return _write(cfg, maps, f"imported from {folder}")

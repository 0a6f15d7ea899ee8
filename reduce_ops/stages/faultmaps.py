"""`reduce-ops faultmaps`: the fleet's fault maps, generated from params or imported; for a
stuck-at fleet (hardware.fault_model: stuck_at) also every faulty PE's stuck register bits."""

from __future__ import annotations

import os
from pathlib import Path

from reduce_ops.config import Config, edited_params, flatten, read_yaml, write_params
from reduce_ops.errors import ConfigError
from reduce_ops.hardware import (
    ArrayGeometry,
    FaultMap,
    generate_fleet,
    import_fault_maps,
    wafer_fleet,
    write_fleet,
)


def _source_dir(cfg: Config) -> Path:
    folder = Path(cfg.faultmaps.import_dir)
    return folder if folder.is_absolute() else cfg.root / folder


def _import(cfg: Config, folder: Path) -> tuple[list[FaultMap], dict]:
    """A test floor's maps: faulty PEs (bypass) or stuck-at maps; every file checked first."""
    geometry = ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols)
    if cfg.hardware.fault_model == "stuck_at":
        from reduce_ops.hardware.stuckfleet import import_stuck_maps  # torch: stuck-at only

        return import_stuck_maps(folder, geometry)
    return import_fault_maps(folder, geometry), {}


def run(cfg: Config) -> list[FaultMap]:
    """Write paths.fleet: faultmaps.import_dir's maps (source: import) or a generated fleet."""
    geometry = ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols)
    fm = cfg.faultmaps
    stuck: dict = {}
    if fm.source == "import":
        maps, stuck = _import(cfg, _source_dir(cfg))
        how = f"imported from {fm.import_dir}"
    elif fm.generator == "wafer":
        maps = wafer_fleet(fm.n_chips, geometry, fm.chips_per_wafer, fm.shared_fraction,
                           fm.rate_distribution, fm.rate_min, fm.rate_max, fm.seed, fm.id_prefix,
                           fm.rate_spread)
        how = (f"{fm.n_chips // fm.chips_per_wafer} wafers of {fm.chips_per_wafer} chips sharing "
               f"{fm.shared_fraction:.0%} of their defects, wafer rates {fm.rate_distribution} "
               f"in [{fm.rate_min:g}, {fm.rate_max:g}], chips within +-{fm.rate_spread:g}")
    else:
        maps = generate_fleet(fm.n_chips, geometry, fm.generator, fm.rate_distribution,
                              fm.rate_min, fm.rate_max, fm.seed, id_prefix=fm.id_prefix)
        how = (f"{fm.generator} defects, rates {fm.rate_distribution} in "
               f"[{fm.rate_min:g}, {fm.rate_max:g}]")
    if cfg.hardware.fault_model == "stuck_at" and fm.source != "import":
        from reduce_ops.hardware.stuckfleet import generate_stuck

        s = cfg.hardware.stuck_at
        stuck = generate_stuck(maps, fm.seed, s.bits, s.n_bits, s.polarity)
    return _write(cfg, maps, stuck, how)


def _write(cfg: Config, maps: list[FaultMap], stuck: dict, how: str) -> list[FaultMap]:
    out = cfg.path("fleet")
    also = None
    if stuck:
        from reduce_ops.hardware.stuckfleet import write_stuck

        def also(folder: Path) -> None:
            write_stuck(stuck, folder)
    write_fleet(maps, out, also=also)
    rates = [m.fault_rate for m in maps]
    model = (f"stuck-at: {sum(s.n_stuck for s in stuck.values())} stuck register bits"
             if stuck else "bypassed PEs")
    print(f"fleet of {len(maps)} chips on a {cfg.hardware.rows}x{cfg.hardware.cols} array "
          f"({how}; {model}); fault rate {min(rates):.3f}..{max(rates):.3f} -> {out}")
    return maps


# what the imported maps were read for: an override of these on the command line goes into the
# params file with the import, so that every later stage reads the fleet the same way
FLEET_KEYS = ("hardware.rows", "hardware.cols", "hardware.fault_model", "hardware.stuck_at.bits",
              "hardware.stuck_at.n_bits", "hardware.stuck_at.polarity")


def import_maps(cfg: Config, params_file: Path, src: Path) -> list[FaultMap]:
    """Import a test floor's maps from `src` and record it in the params file
    (faultmaps.source: import, faultmaps.import_dir: src, and the geometry the maps were read
    for), so `dvc repro` keeps this fleet and re-imports it when its files change instead of
    generating one over it. The params file changes only once the fleet is written."""
    fleet = cfg.path("fleet").resolve()
    if src.resolve() == fleet or fleet in src.resolve().parents:
        raise ConfigError(f"faultmaps import {src}: that is paths.fleet ({fleet}), which the "
                          f"import replaces; keep the test floor's maps in a folder of their own")
    maps, stuck = _import(cfg, src)             # every map is checked before anything is written
    src = src.resolve()
    folder = os.path.relpath(src, cfg.root) if src.is_relative_to(cfg.root) else str(src)
    now = flatten(cfg.to_dict())
    in_file = flatten(read_yaml(params_file))
    values = {"faultmaps.source": "import", "faultmaps.import_dir": folder,
              **{k: now[k] for k in FLEET_KEYS if in_file.get(k) != now[k]}}
    text = edited_params(params_file, values)   # checked (paths too) before anything is written
    written = _write(cfg, maps, stuck, f"imported from {folder}")
    write_params(params_file, text)
    print(f"{params_file.name}: " + ", ".join(f"{k} = {v}" for k, v in values.items())
          + " (dvc repro re-imports it)")
    return written

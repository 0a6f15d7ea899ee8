"""A stuck-at fleet on disk: beside each chip's map of faulty PEs (<chip_id>.npy), the stuck bits
of its weight registers (<chip_id>.stuck.npz), and the import of a test floor's stuck-at maps."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from reduce_ops.errors import FaultMapError
from reduce_ops.hardware.bitfaults import (
    STUCK_SUFFIXES,
    PeStuckMap,
    pe_stuck_map,
    read_pe_stuck_file,
)
from reduce_ops.hardware.faultmap import FaultMap
from reduce_ops.hardware.fleetio import _problems_error
from reduce_ops.hardware.geometry import ArrayGeometry

STUCK_FILE = "{chip_id}.stuck.npz"
POLARITY = {"random": "random", "zero": 0, "one": 1}     # hardware.stuck_at.polarity


def generate_stuck(fleet: Sequence[FaultMap], seed: int, bits: Sequence[int] | None,
                   n_bits: int, polarity: str) -> dict[str, PeStuckMap]:
    """Stuck bits for each chip's faulty PEs, seeded per chip from the fleet seed (apart from
    the maps' own seeds), so adding chips never changes the others."""
    streams = np.random.SeedSequence([seed, 0x57AC]).spawn(len(fleet))
    return {m.chip_id: pe_stuck_map(m.faulty, torch.Generator().manual_seed(
                int(s.generate_state(1)[0])), bits, n_bits, POLARITY[polarity], m.chip_id,
                key="hardware.stuck_at")
            for m, s in zip(fleet, streams)}


def import_stuck_maps(src_dir: str | os.PathLike, geometry: ArrayGeometry
                      ) -> tuple[list[FaultMap], dict[str, PeStuckMap]]:
    """All stuck-at maps in src_dir (.csv `row,col,bit,value` or .npz `stuck_and`/`stuck_or`;
    other files ignored), sorted by chip id: the faulty PEs as FaultMaps and the stuck bits.
    Every file is read and checked first; all problems are reported together, one line each."""
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FaultMapError(f"{src_dir}: stuck-at map source is not a directory")
    files = sorted(p for p in src_dir.iterdir()   # a dangling link gets its own line below
                   if p.suffix.lower() in STUCK_SUFFIXES)
    if not files:
        raise FaultMapError(f"{src_dir}: no stuck-at maps found (expected .csv or .npz files)")
    problems: list[str] = []
    stems: dict[str, Path] = {}
    stuck: dict[str, PeStuckMap] = {}
    for path in files:
        key = path.stem.casefold()
        if key in stems:
            problems.append(f"{src_dir}: duplicate chip id {path.stem!r} from {stems[key].name}, "
                            f"{path.name}")
            continue
        stems[key] = path
        try:
            stuck[path.stem] = read_pe_stuck_file(path, geometry)
        except FaultMapError as err:
            problems.append(str(err))
    if problems:
        raise _problems_error(f"the stuck-at maps in {src_dir}", problems)
    ids = sorted(stuck)
    return ([FaultMap(c, stuck[c].faulty.numpy(), "imported", None) for c in ids],
            {c: stuck[c] for c in ids})


def write_stuck(stuck: Mapping[str, PeStuckMap], folder: Path) -> None:
    """Each chip's stuck bits as <chip_id>.stuck.npz in `folder` (the fleet being written)."""
    for chip_id, s in stuck.items():
        np.savez(folder / STUCK_FILE.format(chip_id=chip_id), stuck_and=s.and_mask.numpy(),
                 stuck_or=s.or_mask.numpy())


def load_stuck(fleet_dir: str | os.PathLike, fleet: Sequence[FaultMap]) -> dict[str, PeStuckMap]:
    """The stuck bits of every chip of a stuck-at fleet, checked against its map of faulty
    PEs; one error listing every chip without a readable, matching file."""
    fleet_dir = Path(fleet_dir)
    problems, out = [], {}
    for m in fleet:
        path = fleet_dir / STUCK_FILE.format(chip_id=m.chip_id)
        if not path.is_file():
            problems.append(f"{path}: no stuck bits for chip {m.chip_id} (a stuck-at fleet "
                            f"needs them: run the faultmaps stage with hardware.fault_model: "
                            f"stuck_at)")
            continue
        try:
            s = _read_npz(path, m.chip_id, m.geometry)
        except FaultMapError as err:
            problems.append(str(err))
            continue
        if not np.array_equal(s.faulty.numpy(), m.faulty):
            problems.append(f"{path}: its stuck PEs are not chip {m.chip_id}'s faulty PEs")
            continue
        out[m.chip_id] = s
    if problems:
        raise _problems_error(f"the stuck-at fleet in {fleet_dir}", problems)
    return out


def _read_npz(path: Path, chip_id: str, geometry: ArrayGeometry) -> PeStuckMap:
    from reduce_ops.hardware.bitfaults import _stuck_npz

    and_mask, or_mask = _stuck_npz(path, geometry)
    return PeStuckMap(chip_id, and_mask, or_mask)

"""Fleet on disk (one <chip_id>.npy per chip + fleet.csv); import of a test floor's fault maps."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from reduce_ops.atomic import atomic_dir, not_a_file_reason, only_files
from reduce_ops.errors import FaultMapError
from reduce_ops.hardware.faultmap import FaultMap, validate_chip_id
from reduce_ops.hardware.geometry import ArrayGeometry

MANIFEST = "fleet.csv"
MANIFEST_COLUMNS = ("chip_id", "fault_rate", "n_faulty", "generator", "seed", "sha256")
IMPORT_SUFFIXES = (".npy", ".csv")
CSV_HEADER = ["row", "col"]
_ASCII_INT = re.compile(r"-?[0-9]+")


def _npy_bytes(faulty: np.ndarray) -> bytes:
    """The .npy file content of a bool map (what sha256 in the manifest covers)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(faulty, dtype=bool), allow_pickle=False)
    return buffer.getvalue()


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape) if shape else "a scalar"


def _problems_error(what: str, problems: list[str]) -> FaultMapError:
    """One error: a summary line "N problem(s) with WHAT:", then one indented line per problem."""
    noun = "problem" if len(problems) == 1 else "problems"
    summary = f"{len(problems)} {noun} with {what}:"
    return FaultMapError("\n".join([summary, *(f"  {p}" for p in problems)]))


def write_fleet(maps: Iterable[FaultMap], out_dir: str | os.PathLike,
                also: Callable[[Path], object] | None = None) -> Path:
    """Write the fleet atomically: all files go to a temporary sibling that then replaces out_dir.

    `also(folder)` writes more files beside the maps (a stuck-at fleet's stuck bits) before the
    swap. On any error the temporary directory is removed and an existing out_dir is left as it
    was.
    """
    maps = list(maps)
    out_dir = Path(out_dir)
    seen: dict[str, str] = {}
    for fault_map in maps:
        key = fault_map.chip_id.casefold()  # a.npy and A.npy collide on case-insensitive disks
        if key in seen:
            raise FaultMapError(
                f"{out_dir}: duplicate chip id {fault_map.chip_id!r} (also {seen[key]!r})"
            )
        seen[key] = fault_map.chip_id
    shapes = {fault_map.faulty.shape for fault_map in maps}
    if len(shapes) > 1:
        raise FaultMapError(
            f"{out_dir}: fault maps of different shapes in one fleet: {sorted(shapes)}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise FaultMapError(f"{out_dir}: exists and is not a directory")

    with atomic_dir(out_dir, "faultmaps", _legacy_fleet) as tmp_dir:
        with open(tmp_dir / MANIFEST, "w", newline="", encoding="utf-8") as manifest:
            writer = csv.writer(manifest)
            writer.writerow(MANIFEST_COLUMNS)
            for fault_map in maps:
                data = _npy_bytes(fault_map.faulty)
                (tmp_dir / f"{fault_map.chip_id}.npy").write_bytes(data)
                writer.writerow([
                    fault_map.chip_id,
                    repr(fault_map.fault_rate),  # repr: shortest exact float text
                    fault_map.n_faulty,
                    fault_map.generator,
                    "" if fault_map.seed is None else fault_map.seed,
                    hashlib.sha256(data).hexdigest(),
                ])
        if also is not None:
            also(tmp_dir)
    return out_dir


def _legacy_fleet(folder: Path) -> bool:
    """A fleet written before output folders were marked: fleet.csv and the maps beside it."""
    return (folder / MANIFEST).is_file() and only_files(MANIFEST, "*.npy", "*.stuck.npz")(folder)


def load_fleet(fleet_dir: str | os.PathLike, geometry: ArrayGeometry) -> list[FaultMap]:
    """Read a fleet written by write_fleet, checking each map's shape and sha256 (fleet.csv)."""
    fleet_dir = Path(fleet_dir)
    manifest_path = fleet_dir / MANIFEST
    if not manifest_path.is_file():
        raise FaultMapError(f"{manifest_path}: fleet manifest not found (run the faultmaps stage)")
    try:
        with open(manifest_path, newline="", encoding="utf-8") as manifest:
            reader = csv.DictReader(manifest)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise FaultMapError(f"{manifest_path}: unreadable fleet manifest ({err})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise FaultMapError(f"{manifest_path}: missing columns {', '.join(missing)}")

    maps: list[FaultMap] = []
    problems: list[str] = []
    seen: set[str] = set()
    for line_no, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{manifest_path} line {line_no}"
        try:
            chip_id = validate_chip_id(row["chip_id"] or "", source=where)
            if chip_id in seen:
                raise FaultMapError(f"{where}: duplicate chip id {chip_id!r}")
            seen.add(chip_id)
            maps.append(_load_fleet_map(fleet_dir, row, geometry))
        except FaultMapError as err:
            problems.append(str(err))
    if problems:
        raise _problems_error(f"the fleet in {fleet_dir}", problems)
    return maps


def _load_fleet_map(fleet_dir: Path, row: dict[str, str], geometry: ArrayGeometry) -> FaultMap:
    """One manifest row's map, verified against the row's sha256 and n_faulty and the geometry."""
    path = fleet_dir / f"{row['chip_id']}.npy"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FaultMapError(f"{path}: cannot read fault map ({err.strerror or err})") from None
    if hashlib.sha256(data).hexdigest() != (row["sha256"] or "").strip().lower():
        raise FaultMapError(
            f"{path}: sha256 does not match {MANIFEST}; the file changed since it was written"
        )
    faulty = _npy_map(path, data, geometry)
    seed_text = (row["seed"] or "").strip()
    try:
        seed = int(seed_text) if seed_text else None
        n_faulty = int(row["n_faulty"])
    except ValueError:
        raise FaultMapError(f"{path}: seed / n_faulty in {MANIFEST} are not integers") from None
    generator = (row["generator"] or "").strip() or "imported"
    fault_map = FaultMap(row["chip_id"], faulty, generator, seed)
    if fault_map.n_faulty != n_faulty:
        raise FaultMapError(
            f"{path}: {fault_map.n_faulty} faulty PEs, but {MANIFEST} says {n_faulty}"
        )
    return fault_map


def _npy_map(path: Path, data: bytes, geometry: ArrayGeometry) -> np.ndarray:
    """Bool [rows, cols] from .npy file bytes holding bool, or 0/1 ints or floats."""
    if not data.startswith(np.lib.format.MAGIC_PREFIX):  # also rejects .npz and pickles
        raise FaultMapError(f"{path}: unreadable or corrupt .npy file (no NumPy array header)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise FaultMapError(f"{path}: unreadable or corrupt .npy file ({reason})") from None
    if array.shape != geometry.shape:
        raise FaultMapError(
            f"{path}: wrong shape for the configured {geometry} array: "
            f"expected {_shape_text(geometry.shape)}, got {_shape_text(array.shape)}"
        )
    if array.dtype == np.bool_:
        return array
    if array.dtype.kind not in "iuf":
        raise FaultMapError(f"{path}: values must be bool or 0/1 numbers, got dtype {array.dtype}")
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise FaultMapError(f"{path}: contains NaN; values must be 0 or 1")
    bad = (array != 0) & (array != 1)  # [rows, cols]
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise FaultMapError(
            f"{path}: values must be 0 or 1, found {array[r, c].item()!r} at row {r}, col {c} "
            f"({int(bad.sum())} non-binary values)"
        )
    return array == 1


def _csv_lines(path: Path, header: list[str]) -> list[list[str]]:
    """The rows of a map CSV, its first line checked against `header` (case and spaces
    ignored, a BOM tolerated); one FaultMapError line for an unreadable file or a wrong header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate a BOM
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise FaultMapError(f"{path}: unreadable or corrupt .csv file ({err})") from None
    if not lines or [cell.strip().lower() for cell in lines[0]] != header:
        got = ",".join(lines[0]) if lines else "an empty file"
        raise FaultMapError(
            f"{path}: first line must be the header '{','.join(header)}', got {got!r}")
    return lines


def _csv_map(path: Path, geometry: ArrayGeometry) -> np.ndarray:
    """Bool [rows, cols] from a CSV with header `row,col` and one faulty PE per line."""
    lines = _csv_lines(path, CSV_HEADER)
    faulty = np.zeros(geometry.shape, dtype=bool)
    first_line: dict[tuple[int, int], int] = {}
    for line_no, cells in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # blank line
        where = f"{path} line {line_no}"
        if len(cells) != 2:
            raise FaultMapError(f"{where}: expected 'row,col', got {','.join(cells)!r}")
        coords = []
        axes = (("row", cells[0], geometry.rows), ("col", cells[1], geometry.cols))
        for axis, text, size in axes:
            if not _ASCII_INT.fullmatch(text.strip()):   # int() takes "1_0", "+3", "١"
                raise FaultMapError(f"{where}: {axis} {text.strip()!r} is not an integer "
                                    f"(digits 0-9 only)")
            value = int(text.strip())
            if value < 0:
                raise FaultMapError(f"{where}: {axis} {value} is negative")
            if value >= size:
                raise FaultMapError(
                    f"{where}: {axis} {value} out of range for the configured {geometry} array "
                    f"(0..{size - 1})"
                )
            coords.append(value)
        pe = (coords[0], coords[1])
        if pe in first_line:
            raise FaultMapError(
                f"{where}: PE {pe[0]},{pe[1]} already listed on line {first_line[pe]}"
            )
        first_line[pe] = line_no
        faulty[pe] = True
    return faulty


def read_fault_map_file(path: str | os.PathLike, geometry: ArrayGeometry) -> FaultMap:
    """One test-floor map: .npy of bool or 0/1, or .csv of faulty `row,col`; id = file stem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMPORT_SUFFIXES:
        raise FaultMapError(f"{path}: unsupported fault map file type; use .npy or .csv")
    chip_id = validate_chip_id(path.stem, source=str(path))
    if not path.is_file():
        raise FaultMapError(f"{path}: {not_a_file_reason(path)}")
    if suffix == ".npy":
        try:
            data = path.read_bytes()
        except OSError as err:
            reason = err.strerror or err
            raise FaultMapError(f"{path}: unreadable fault map file ({reason})") from None
        faulty = _npy_map(path, data, geometry)
    else:
        faulty = _csv_map(path, geometry)
    return FaultMap(chip_id, faulty, "imported", None)


def import_fault_maps(src_dir: str | os.PathLike, geometry: ArrayGeometry) -> list[FaultMap]:
    """All .npy / .csv fault maps in src_dir (other files ignored), sorted by chip id.

    Every file is checked; all problems are reported together in one FaultMapError, one line each.
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FaultMapError(f"{src_dir}: fault map source is not a directory")
    # every entry named like a map counts, so that a dangling link, a link loop or a folder
    # named chip.npy gets its own line below instead of a chip silently missing
    files = sorted(p for p in src_dir.iterdir() if p.suffix.lower() in IMPORT_SUFFIXES)
    if not files:
        raise FaultMapError(f"{src_dir}: no fault maps found (expected .npy or .csv files)")

    problems: list[str] = []
    by_id: dict[str, list[Path]] = {}
    for path in files:
        by_id.setdefault(path.stem.casefold(), []).append(path)
    for paths in by_id.values():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            problems.append(f"{src_dir}: duplicate chip id {paths[0].stem!r} from {names}")

    maps: list[FaultMap] = []
    for path in files:
        try:
            maps.append(read_fault_map_file(path, geometry))
        except FaultMapError as err:
            problems.append(str(err))
    if problems:
        raise _problems_error(f"the fault maps in {src_dir}", problems)
    return sorted(maps, key=lambda fault_map: fault_map.chip_id)

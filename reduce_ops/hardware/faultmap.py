"""Fault maps (which PEs of one chip are faulty) and seeded generators for maps and fleets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from reduce_ops.errors import FaultMapError
from reduce_ops.hardware.geometry import ArrayGeometry
from reduce_ops.names import safe_name_problem

# A seed is an int, a SeedSequence or an already-built Generator (used as is).
Seed = int | np.random.SeedSequence | np.random.Generator | None

def validate_chip_id(chip_id: str, source: str = "") -> str:
    """Return chip_id if safe as a file name and registry suffix; else raise one clear line."""
    problem = safe_name_problem(chip_id)
    if problem:
        where = f"{source}: " if source else ""
        raise FaultMapError(f"{where}unsafe chip id {chip_id!r}: {problem}")
    return chip_id


@dataclass(frozen=True, eq=False)
class FaultMap:
    """One chip's fault map: faulty[r, c] is True when PE (r, c) is faulty and bypassed.

    `generator` and `seed` record where the map came from ("imported" maps have no seed), so a
    generated map can be rebuilt from the fleet manifest. The array is stored read-only.
    """

    chip_id: str
    faulty: np.ndarray  # bool [rows, cols]
    generator: str = "imported"
    seed: int | None = None

    def __post_init__(self) -> None:
        validate_chip_id(self.chip_id)
        faulty = np.asarray(self.faulty)
        if faulty.dtype != np.bool_ or faulty.ndim != 2 or 0 in faulty.shape:
            raise FaultMapError(
                f"chip {self.chip_id}: fault map must be a non-empty 2-D bool array, "
                f"got dtype {faulty.dtype} and shape {faulty.shape}"
            )
        faulty = faulty.copy()
        faulty.flags.writeable = False
        object.__setattr__(self, "faulty", faulty)

    @property
    def geometry(self) -> ArrayGeometry:
        """Array geometry implied by the map's shape."""
        return ArrayGeometry(*self.faulty.shape)

    @property
    def n_faulty(self) -> int:
        """Number of faulty PEs."""
        return int(np.count_nonzero(self.faulty))

    @property
    def fault_rate(self) -> float:
        """Fraction of faulty PEs."""
        return self.n_faulty / self.faulty.size

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FaultMap):
            return NotImplemented
        return (
            self.chip_id == other.chip_id
            and self.generator == other.generator
            and self.seed == other.seed
            and np.array_equal(self.faulty, other.faulty)
        )

    __hash__ = None  # mutable-looking payload; compare, don't hash

    def __repr__(self) -> str:
        return (
            f"FaultMap(chip_id={self.chip_id!r}, geometry={self.geometry}, "
            f"n_faulty={self.n_faulty}, generator={self.generator!r}, seed={self.seed!r})"
        )


def _n_target(geometry: ArrayGeometry, rate: float) -> int:
    """Number of faulty PEs for a fault rate: round(rate * rows * cols)."""
    if not isinstance(rate, (int, float, np.floating, np.integer)) or not 0.0 <= rate <= 1.0:
        raise FaultMapError(f"fault rate must be a number in [0, 1], got {rate!r}")
    return int(round(float(rate) * geometry.n_pes))


def _seed_int(seed: Seed) -> int | None:
    """Seed to record in a FaultMap: an int; other seeds cannot be written to the manifest."""
    return int(seed) if isinstance(seed, (int, np.integer)) else None


def uniform_fault_map(
    geometry: ArrayGeometry, rate: float, seed: Seed, chip_id: str = "chip"
) -> FaultMap:
    """Exactly round(rate * N) faulty PEs at uniformly random distinct positions."""
    n_target = _n_target(geometry, rate)
    rng = np.random.default_rng(seed)
    flat = np.zeros(geometry.n_pes, dtype=bool)
    flat[rng.choice(geometry.n_pes, size=n_target, replace=False)] = True
    return FaultMap(chip_id, flat.reshape(geometry.shape), "uniform", _seed_int(seed))


def clustered_fault_map(
    geometry: ArrayGeometry,
    rate: float,
    seed: Seed,
    chip_id: str = "chip",
    cluster_size: float = 8.0,
    cluster_sigma: float = 1.5,
    max_rounds: int = 64,
) -> FaultMap:
    """Exactly round(rate * N) faulty PEs in spatial clusters, as manufacturing defects appear.

    Model (a Neyman-Scott cluster process, the usual picture of wafer defects):
    - cluster centres are uniform over the array;
    - each centre gets 1 + Poisson(cluster_size - 1) defects, so `cluster_size` is the mean
      number of defects per cluster;
    - each defect sits at the centre plus a 2-D Gaussian offset with standard deviation
      `cluster_sigma` PEs per axis and lands on the PE that contains it; defects off the array
      are dropped (they are off the die), not clipped, so edges get no extra faults;
    - a defect on an already faulty PE adds nothing.
    Rounds of new clusters are added until the target count is reached; the number of centres
    per round is the missing count divided by (cluster_size * free fraction), which keeps the
    number of rounds small even at high rates. The last round's surplus new faults are dropped
    at random, so the count is exact. After `max_rounds` (only reached for pathological
    parameters) the remainder is drawn uniformly from the free PEs.
    """
    n_target = _n_target(geometry, rate)
    if not cluster_size >= 1.0:
        raise FaultMapError(f"cluster_size must be >= 1, got {cluster_size!r}")
    if not cluster_sigma >= 0.0:
        raise FaultMapError(f"cluster_sigma must be >= 0, got {cluster_sigma!r}")
    rng = np.random.default_rng(seed)
    rows, cols = geometry.shape
    n_pes = geometry.n_pes
    # [rows * cols], row-major PE index r * cols + c; at rate 1 every PE is faulty already
    flat = np.full(n_pes, n_target == n_pes)
    n_faulty = int(np.count_nonzero(flat))
    for _ in range(max_rounds):
        missing = n_target - n_faulty
        if missing <= 0:
            break
        free_fraction = 1.0 - n_faulty / n_pes
        n_centres = math.ceil(missing / (cluster_size * free_fraction))
        centres = rng.random((n_centres, 2)) * (rows, cols)  # [n_centres, 2] continuous (r, c)
        per_centre = 1 + rng.poisson(cluster_size - 1.0, size=n_centres)  # [n_centres]
        defects = np.repeat(centres, per_centre, axis=0)  # [n_defects, 2]
        defects += rng.normal(0.0, cluster_sigma, size=defects.shape)
        r = np.floor(defects[:, 0]).astype(np.int64)  # floor of a continuous position = its PE
        c = np.floor(defects[:, 1]).astype(np.int64)
        on_die = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        idx = np.unique(r[on_die] * cols + c[on_die])
        new = idx[~flat[idx]]  # PEs that become faulty in this round
        if new.size > missing:  # drop the surplus at random so the count is exact
            new = rng.choice(new, size=missing, replace=False)
        flat[new] = True
        n_faulty += new.size
    missing = n_target - n_faulty
    if missing > 0:
        flat[rng.choice(np.flatnonzero(~flat), size=missing, replace=False)] = True
    return FaultMap(chip_id, flat.reshape(rows, cols), "clustered", _seed_int(seed))


GENERATORS: dict[str, Callable[..., FaultMap]] = {
    "uniform": uniform_fault_map,
    "clustered": clustered_fault_map,
}

# Beta(1, 3) on [low, high]: density 3 (1 - x)^2, highest at low, zero at high, mean at a
# quarter of the range. Yield makes low-fault chips the common case and bad chips rare.
BETA_SHAPE = (1.0, 3.0)

RATE_DISTRIBUTIONS = ("uniform", "beta")


def sample_fleet_rates(
    n_chips: int, distribution: str, low: float, high: float, seed: Seed
) -> np.ndarray:
    """Fault rate per chip [n_chips] in [low, high]: "uniform", or "beta" (most chips few faults).

    "beta" draws low + (high - low) * Beta(1, 3): the density is highest at `low` and falls to
    zero at `high`, mimicking a yield distribution where heavily faulty chips are rare.
    """
    if isinstance(n_chips, bool) or not isinstance(n_chips, (int, np.integer)) or n_chips < 0:
        raise FaultMapError(f"number of chips must be a non-negative integer, got {n_chips!r}")
    if not (0.0 <= low <= high <= 1.0):
        raise FaultMapError(
            f"fault rate range must satisfy 0 <= low <= high <= 1, got [{low}, {high}]"
        )
    rng = np.random.default_rng(seed)
    if distribution == "uniform":
        unit = rng.random(n_chips)
    elif distribution == "beta":
        unit = rng.beta(*BETA_SHAPE, size=n_chips)
    else:
        raise FaultMapError(
            f"unknown fault rate distribution {distribution!r}; "
            f"choose one of {', '.join(RATE_DISTRIBUTIONS)}"
        )
    return low + (high - low) * unit


def chip_ids(n_chips: int, prefix: str = "chip") -> list[str]:
    """Chip ids "<prefix>-000", ... zero-padded to the width of n_chips - 1 (at least 3 digits)."""
    width = max(3, len(str(max(n_chips - 1, 0))))
    ids = [f"{prefix}-{i:0{width}d}" for i in range(n_chips)]
    for chip_id in ids:
        validate_chip_id(chip_id, source=f"chip id prefix {prefix!r}")
    return ids


def generate_fleet(
    n_chips: int,
    geometry: ArrayGeometry,
    generator: str,
    distribution: str,
    rate_low: float,
    rate_high: float,
    seed: int,
    id_prefix: str = "chip",
) -> list[FaultMap]:
    """A reproducible fleet: per-chip rates from `distribution`, then one seeded map per chip.

    The fleet seed spawns independent streams (numpy SeedSequence): one for the rates and one
    per chip. Each chip's map is seeded by a 32-bit int drawn from its own stream and recorded
    in FaultMap.seed, so GENERATORS[generator](geometry, map.fault_rate, map.seed, chip_id)
    rebuilds that map alone, and adding chips never changes the existing ones' seeds.
    """
    if generator not in GENERATORS:
        raise FaultMapError(
            f"unknown fault map generator {generator!r}; choose one of {', '.join(GENERATORS)}"
        )
    make_map = GENERATORS[generator]
    ids = chip_ids(n_chips, id_prefix)
    rates_stream, maps_stream = np.random.SeedSequence(seed).spawn(2)
    rates = sample_fleet_rates(n_chips, distribution, rate_low, rate_high, rates_stream)
    chip_streams = maps_stream.spawn(n_chips)
    fleet = []
    for chip_id, rate, stream in zip(ids, rates, chip_streams):
        chip_seed = int(stream.generate_state(1)[0])  # uint32 -> int, easy to store in CSV
        fleet.append(make_map(geometry, float(rate), chip_seed, chip_id))
    return fleet


def wafer_fleet(
    n_chips: int,
    geometry: ArrayGeometry,
    chips_per_wafer: int,
    shared_fraction: float,
    distribution: str,
    rate_low: float,
    rate_high: float,
    seed: int,
    id_prefix: str = "chip",
    rate_spread: float = 0.02,
) -> list[FaultMap]:
    """A fleet of wafers whose chips share part of their defects (systematic defects repeat at
    the same array position on every die of a wafer; the rest are random per die).

    Defect density is a property of the wafer (wafer-to-wafer variation dominates die-to-die
    variation on one wafer): each wafer draws a fault rate from `distribution` on [rate_low,
    rate_high], and each of its chips that rate plus a uniform offset in [-rate_spread,
    +rate_spread], clipped to [rate_low, rate_high] (a spread as wide as the range makes the
    chips' rates nearly independent of their wafer). Each wafer draws an ordered list of
    systematic defect sites, round(shared_fraction * rate_high * N) PEs. A chip with fault rate r
    has n = round(r * N) faulty PEs: the first min(round(shared_fraction * n), list length) sites
    of its wafer's list (a worse die shows more of them) and the rest uniformly among the other
    PEs. Chips sharing a wafer therefore overlap far more than independent chips, and a group of
    them fuses into a map barely larger than its worst member's. Seeded like `generate_fleet`:
    the fleet seed spawns one stream for the rates, one per wafer and one per chip.
    """
    if chips_per_wafer < 1 or n_chips % chips_per_wafer:
        raise FaultMapError(f"faultmaps.chips_per_wafer: {chips_per_wafer} does not divide the "
                            f"fleet of {n_chips} chips")
    if not 0.0 <= shared_fraction <= 1.0:
        raise FaultMapError(f"faultmaps.shared_fraction: must be in [0, 1], got {shared_fraction}")
    if not 0.0 <= rate_spread <= 1.0:
        raise FaultMapError(f"faultmaps.rate_spread: must be in [0, 1], got {rate_spread}")
    ids = chip_ids(n_chips, id_prefix)
    n_wafers = n_chips // chips_per_wafer
    rates_stream, wafers_stream, chips_stream = np.random.SeedSequence(seed).spawn(3)
    wafer_seed, offset_seed = rates_stream.spawn(2)
    wafer_rates = sample_fleet_rates(n_wafers, distribution, rate_low, rate_high, wafer_seed)
    offsets = np.random.default_rng(offset_seed).uniform(-rate_spread, rate_spread, n_chips)
    rates = np.clip(np.repeat(wafer_rates, chips_per_wafer) + offsets, rate_low, rate_high)
    n_pes = geometry.n_pes
    n_shared = int(round(shared_fraction * rate_high * n_pes))
    wafers = [np.random.default_rng(s).permutation(n_pes)[:n_shared]
              for s in wafers_stream.spawn(n_wafers)]
    fleet = []
    for i, (chip_id, rate, stream) in enumerate(zip(ids, rates, chips_stream.spawn(n_chips))):
        n_faulty = _n_target(geometry, float(rate))
        sites = wafers[i // chips_per_wafer]
        shared = sites[: min(int(round(shared_fraction * n_faulty)), len(sites))]
        flat = np.zeros(n_pes, dtype=bool)
        flat[shared] = True
        rest = np.random.default_rng(stream).choice(np.flatnonzero(~flat),
                                                    size=n_faulty - len(shared), replace=False)
        flat[rest] = True
        fleet.append(FaultMap(chip_id, flat.reshape(geometry.shape), "wafer", None))
    return fleet

"""Faults on the stored bits of int8 two's-complement weights: random bit flips, stuck-at cells,
and PE-level stuck-at (a faulty PE's weight register forces bits of every weight mapped onto it).

Bits are numbered 0 = LSB ... 7 = sign bit of the int8 value; all bit logic works on the uint8
view of the same bytes, so flipping bit 7 of +127 (0x7F) reads 0xFF = -1. Every fault is drawn
from an explicit torch.Generator (the fault seed, apart from any training seed) and acts on whole
tensors at once; the only Python loops are over layers, file lines and rejection rounds.

How random faults are drawn (the same for bit flips and stuck cells): n ~ Binomial(N, p) cells,
then n distinct cells uniformly at random, drawn with replacement and topped up until n are
distinct (above N / 2 the complement is drawn instead). Given its size, a uniform subset is
exactly what N independent Bernoulli(p) cells give, so the law is the same as drawing one random
number per bit, at a cost of O(n log n) instead of O(N): about 74k cells for the 74M bits of
VGG11 at BER 1e-3.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reduce_ops.atomic import not_a_file_reason, write_file
from reduce_ops.errors import ConfigError, FaultMapError
from reduce_ops.hardware.faultmap import FaultMap, validate_chip_id
from reduce_ops.hardware.fleetio import _csv_lines, _problems_error, _shape_text
from reduce_ops.hardware.geometry import ArrayGeometry
from reduce_ops.hardware.mapping import (
    _faulty_array,
    _weight_param_name,
    array_groups,
    mapped_layers,
    tile_pe_grid,
)

N_BITS = 8                        # an int8 weight is one byte
ALL_BITS = tuple(range(N_BITS))   # 0 = LSB ... 7 = sign bit
POLARITIES = (0, 1, "random")     # stuck-at 0, stuck-at 1, or a fair coin per stuck cell
STUCK_SUFFIXES = (".csv", ".npz")
STUCK_CSV_HEADER = ["row", "col", "bit", "value"]
STUCK_NPZ_ARRAYS = ("stuck_and", "stuck_or")
MAX_LISTED_PROBLEMS = 20          # a broken file lists this many problems, then a count

# popcount of every byte value: bits set in 0..255
_POPCOUNT = torch.tensor([v.bit_count() for v in range(256)], dtype=torch.int64)


# --------------------------------------------------------------------------- argument checks


def check_rate(value: object, key: str = "ber", what: str = "BER") -> float:
    """A probability in [0, 1] as a float; anything else is one ConfigError line naming `key`."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not 0.0 <= float(value) <= 1.0):  # NaN fails the comparison too
        raise ConfigError(f"{key}: {what} must be in [0, 1], got {value!r}")
    return float(value)


def check_bits(bits: Iterable[int] | None, key: str = "bits") -> tuple[int, ...]:
    """Distinct bit positions 0..7 (None = all eight), in the order given."""
    if bits is None:
        return ALL_BITS
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Iterable):
        raise ConfigError(f"{key}: bit positions must be a list of integers 0..7, got {bits!r}")
    out: list[int] = []
    for bit in bits:
        if isinstance(bit, bool) or not isinstance(bit, numbers.Integral):
            raise ConfigError(f"{key}: bit position {bit!r} is not an integer")
        if not 0 <= bit < N_BITS:
            raise ConfigError(f"{key}: bit position {bit} out of range 0..{N_BITS - 1}")
        if int(bit) in out:
            raise ConfigError(f"{key}: bit position {bit} listed twice")
        out.append(int(bit))
    if not out:
        raise ConfigError(f"{key}: no bit positions given")
    return tuple(out)


def check_polarity(polarity: object, key: str = "polarity") -> int | str:
    """0, 1 or 'random'."""
    if isinstance(polarity, bool) or polarity not in POLARITIES:
        raise ConfigError(f"{key}: polarity must be 0, 1 or 'random', got {polarity!r}")
    return polarity  # type: ignore[return-value]


def _check_generator(generator: object, key: str) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ConfigError(
            f"{key}: faults need an explicit torch.Generator (the fault seed), "
            f"got {type(generator).__name__}"
        )
    return generator


def _shape(shape: Iterable[int] | torch.Size) -> tuple[int, ...]:
    return tuple(int(s) for s in shape)


# --------------------------------------------------------------------------- sampling


def _distinct_uniform(n_total: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n distinct indices in [0, n_total), uniform over all n-subsets; sorted int64 [n]."""
    if n > n_total // 2:  # dense: draw the few cells left out, then take the rest
        left_out = _distinct_uniform(n_total, n_total - n, generator)
        chosen = torch.ones(n_total, dtype=torch.bool, device=generator.device)
        chosen.index_fill_(0, left_out, False)
        return chosen.nonzero().squeeze(1)
    picked = torch.empty(0, dtype=torch.int64, device=generator.device)
    # With replacement, then top up: the first n distinct values of an i.i.d. uniform sequence
    # are a uniform n-subset. n <= n_total / 2, so each round at least halves the shortfall.
    while picked.numel() < n:
        extra = torch.randint(n_total, (n - picked.numel(),), generator=generator,
                              device=generator.device)
        picked = torch.unique(torch.cat([picked, extra]))  # sorted
    return picked


def sample_cells(n_total: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the cells hit when each of n_total cells is hit independently with
    probability p: a Binomial(n_total, p) count, then that many distinct uniform cells.
    Sorted int64 on the generator's device."""
    if n_total == 0 or p == 0.0:
        n = 0
    elif p == 1.0:
        n = n_total
    else:  # float64: counts above 2**24 are exact
        count = torch.tensor(float(n_total), dtype=torch.float64, device=generator.device)
        n = int(torch.binomial(count, torch.full_like(count, p), generator=generator).item())
    return _distinct_uniform(n_total, n, generator)


def _or_per_byte(byte: torch.Tensor, *bit_values: torch.Tensor) -> list[torch.Tensor]:
    """Group sorted byte indices [n] that carry bit values (1 << bit, or 0), distinct bits per
    byte: [unique byte indices [u], then per bit_values the OR over each byte as int64 [u]].

    The bits of one byte are distinct, so their sum is their OR.
    """
    index, inverse = torch.unique_consecutive(byte, return_inverse=True)
    zeros = torch.zeros(index.numel(), dtype=torch.int64, device=byte.device)
    return [index, *(zeros.clone().index_add_(0, inverse, v) for v in bit_values)]


def _as_int8(q: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise FaultMapError(f"{what}: stored weights must be an int8 tensor, got {got}")
    return q


def _check_shape(q: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(q.shape) != shape:
        raise FaultMapError(
            f"{what} of shape {_shape_text(shape)} applied to weights of shape "
            f"{_shape_text(tuple(q.shape))}"
        )


# --------------------------------------------------------------------------- bit flips


@dataclass(frozen=True)
class BitFlips:
    """Flipped stored bits of one int8 tensor: each touched byte (flat index) and its XOR mask.

    Kept sparse (about BER * 8 bytes per weight), so a trial's faults cost little memory and can
    be applied to any stored values of this shape; the same pattern reads the same way each time.
    apply_ touches only the flipped bytes and is its own inverse (XOR), so a trial can flip a
    stored tensor in place and flip it back exactly, without a full copy.
    """

    shape: tuple[int, ...]
    index: torch.Tensor   # int64 [u], sorted flat byte indices
    xor: torch.Tensor     # uint8 [u], bits flipped in each of those bytes
    n_flipped: int        # bits flipped in all

    def apply_(self, q: torch.Tensor) -> torch.Tensor:
        """Flip the bits of int8 `q` (contiguous) in place; returns q. Twice restores q."""
        _check_shape(_as_int8(q, "bit flips"), self.shape, "bit flips")
        if not q.is_contiguous():
            raise FaultMapError("bit flips: in-place flips need a contiguous tensor")
        if self.index.numel():
            flat = q.view(torch.uint8).view(-1)  # [numel], the same bytes
            index = self.index.to(q.device)
            # index_select / index_copy_ rather than flat[index]: for a few thousand bytes,
            # advanced indexing goes multi-threaded and waits milliseconds on a busy CPU.
            touched = flat.index_select(0, index).bitwise_xor_(self.xor.to(q.device))
            flat.index_copy_(0, index, touched)
        return q

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """The int8 values read back: q with the flipped bits inverted (a new tensor)."""
        _check_shape(_as_int8(q, "bit flips"), self.shape, "bit flips")
        return self.apply_(q.clone(memory_format=torch.contiguous_format))

    __call__ = apply


def draw_bit_flips(shape: Iterable[int], ber: float, generator: torch.Generator,
                   key: str = "ber") -> BitFlips:
    """Every stored bit of an int8 tensor of `shape` flips independently with probability `ber`."""
    ber = check_rate(ber, key)
    generator = _check_generator(generator, key)
    shape = _shape(shape)
    cells = sample_cells(math.prod(shape) * N_BITS, ber, generator)  # bit cell = 8 * byte + bit
    index, xor = _or_per_byte(cells >> 3, torch.ones_like(cells) << (cells & 7))
    return BitFlips(shape, index, xor.to(torch.uint8), int(cells.numel()))


def bit_flip(q: torch.Tensor, ber: float, generator: torch.Generator, key: str = "ber",
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(faulty copy of int8 `q` with each bit flipped with probability `ber`, bits flipped).

    `out` (int8, q's shape, contiguous; e.g. the previous trial's copy) is overwritten instead
    of allocating a new tensor.
    """
    flips = draw_bit_flips(_as_int8(q, key).shape, ber, generator, key)
    if out is None:
        return flips.apply(q), flips.n_flipped
    if out.dtype != torch.int8 or out.shape != q.shape or not out.is_contiguous():
        raise FaultMapError(f"{key}: out must be a contiguous int8 tensor of shape "
                            f"{_shape_text(tuple(q.shape))}")
    return flips.apply_(out.copy_(q)), flips.n_flipped


def draw_model_bit_flips(shapes: Mapping[str, Iterable[int]], ber: float,
                         generator: torch.Generator, key: str = "ber") -> dict[str, BitFlips]:
    """One trial's fresh bit flips for every weight in `shapes` (e.g. QuantizedWeights.shapes()),
    by parameter name."""
    return {name: draw_bit_flips(shape, ber, generator, key) for name, shape in shapes.items()}


# --------------------------------------------------------------------------- stuck-at cells


def popcount(masks: torch.Tensor) -> int:
    """Number of set bits in a uint8 tensor."""
    return int(_POPCOUNT.to(masks.device)[masks.long()].sum())


@dataclass(frozen=True)
class StuckBits:
    """Stuck bit cells of one int8 tensor: read = (stored & and_mask) | or_mask (uint8 views).

    A cell is stuck where its and_mask bit is 0; it then reads its or_mask bit (1 = stuck at 1).
    or_mask sets no bit that and_mask keeps, so one pair of masks is one set of stuck cells.
    The masks persist: every read forces the same bits whatever was stored.
    """

    and_mask: torch.Tensor  # uint8, the weight's shape
    or_mask: torch.Tensor   # uint8, the weight's shape

    def __post_init__(self) -> None:
        a, o = self.and_mask, self.or_mask
        if a.dtype != torch.uint8 or o.dtype != torch.uint8 or a.shape != o.shape:
            raise FaultMapError(
                f"stuck-at masks must be two uint8 tensors of one shape, got {a.dtype} "
                f"{_shape_text(tuple(a.shape))} and {o.dtype} {_shape_text(tuple(o.shape))}"
            )
        if bool((a & o).any()):
            raise FaultMapError("stuck-at masks: or_mask sets bits that and_mask does not clear")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.and_mask.shape)

    @property
    def n_stuck(self) -> int:
        """Number of stuck bit cells."""
        return popcount(~self.and_mask)

    def apply_(self, q: torch.Tensor) -> torch.Tensor:
        """Force the stuck bits of int8 `q` in place; returns q."""
        _check_shape(_as_int8(q, "stuck-at masks"), self.shape, "stuck-at masks")
        stored = q.view(torch.uint8)  # the same bytes
        stored.bitwise_and_(self.and_mask.to(q.device)).bitwise_or_(self.or_mask.to(q.device))
        return q

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """The int8 values read back: stuck bits forced, the others as stored (a new tensor)."""
        _check_shape(_as_int8(q, "stuck-at masks"), self.shape, "stuck-at masks")
        stored = q.view(torch.uint8)
        read = (stored & self.and_mask.to(q.device)) | self.or_mask.to(q.device)
        return read.view(torch.int8)

    __call__ = apply


def _polarity_values(polarity: int | str, n: int | tuple[int, ...],
                     generator: torch.Generator) -> torch.Tensor:
    """0/1 int64 stuck values: all `polarity`, or fair coins from the generator."""
    size = (n,) if isinstance(n, int) else n
    if polarity == "random":
        return torch.randint(2, size, generator=generator, device=generator.device)
    return torch.full(size, int(polarity), dtype=torch.int64, device=generator.device)


def stuck_at(shape: Iterable[int], fraction: float, polarity: int | str,
             generator: torch.Generator, bits: Iterable[int] | None = None,
             key: str = "stuck_at") -> tuple[StuckBits, int]:
    """Each bit cell at the `bits` positions (None = all) of an int8 tensor of `shape` is stuck
    independently with probability `fraction`, at `polarity` (0, 1 or 'random' per cell).

    Returns the masks and the number of stuck cells.
    """
    fraction = check_rate(fraction, key, "stuck-at fraction")
    bit_list = check_bits(bits, f"{key}.bits")
    polarity = check_polarity(polarity, f"{key}.polarity")
    generator = _check_generator(generator, key)
    shape = _shape(shape)
    n_bits = len(bit_list)
    cells = sample_cells(math.prod(shape) * n_bits, fraction, generator)  # n_bits * byte + slot
    bit_table = torch.tensor(bit_list, dtype=torch.int64, device=cells.device)
    bit_values = torch.ones_like(cells) << bit_table[cells % n_bits]  # [n] 1 << bit
    stuck_one = bit_values * _polarity_values(polarity, cells.numel(), generator)
    index, cleared, set_ones = _or_per_byte(cells // n_bits, bit_values, stuck_one)
    device = generator.device
    and_mask = torch.full(shape, 0xFF, dtype=torch.uint8, device=device)
    or_mask = torch.zeros(shape, dtype=torch.uint8, device=device)
    and_mask.view(-1).index_copy_(0, index, (0xFF ^ cleared).to(torch.uint8))
    or_mask.view(-1).index_copy_(0, index, set_ones.to(torch.uint8))
    return StuckBits(and_mask, or_mask), int(cells.numel())


# --------------------------------------------------------------------------- PE-level stuck-at


@dataclass(frozen=True, eq=False)
class PeStuckMap:
    """One chip's stuck weight-register bits: per-PE and/or masks [rows, cols] (uint8).

    Every weight mapped onto PE (r, c) (W[m, k] with k mod rows = r, m mod cols = c) is read as
    (stored & and_mask[r, c]) | or_mask[r, c]. A PE with any stuck bit is faulty.
    """

    chip_id: str
    and_mask: torch.Tensor  # uint8 [rows, cols]; 0 bits are stuck
    or_mask: torch.Tensor   # uint8 [rows, cols]; 1 bits are stuck at 1

    def __post_init__(self) -> None:
        validate_chip_id(self.chip_id)
        a, o = self.and_mask, self.or_mask
        if (not isinstance(a, torch.Tensor) or not isinstance(o, torch.Tensor)
                or a.dtype != torch.uint8 or o.dtype != torch.uint8 or a.dim() != 2
                or a.shape != o.shape or a.numel() == 0):
            raise FaultMapError(
                f"chip {self.chip_id}: PE stuck-at masks must be two non-empty 2-D uint8 "
                f"tensors of one shape"
            )
        StuckBits(a, o)  # or_mask within the stuck cells
        object.__setattr__(self, "and_mask", a.detach().cpu().clone())
        object.__setattr__(self, "or_mask", o.detach().cpu().clone())

    @property
    def geometry(self) -> ArrayGeometry:
        return ArrayGeometry(*self.and_mask.shape)

    @property
    def faulty(self) -> torch.Tensor:
        """Bool [rows, cols]: PEs with at least one stuck bit."""
        return self.and_mask != 0xFF

    @property
    def n_faulty(self) -> int:
        return int(self.faulty.sum())

    @property
    def fault_rate(self) -> float:
        """Fraction of PEs with stuck bits."""
        return self.n_faulty / self.and_mask.numel()

    @property
    def n_stuck(self) -> int:
        """Stuck bits over all PEs."""
        return popcount(~self.and_mask)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeStuckMap):
            return NotImplemented
        return (self.chip_id == other.chip_id and torch.equal(self.and_mask, other.and_mask)
                and torch.equal(self.or_mask, other.or_mask))

    __hash__ = None

    def layer_bits(self, weight_shape: Iterable[int],
                   device: torch.device | str | None = None, groups: int = 1) -> StuckBits:
        """The stuck bits of one weight: the PE masks tiled over its [M, K] view, like the
        keep mask of a fault map (mapping.tile_pe_grid; `groups` of a grouped conv)."""
        shape = _shape(weight_shape)
        # [cols, rows]: grid_t[c, r] is PE (r, c)
        and_t = self.and_mask.T.contiguous().to(device)
        or_t = self.or_mask.T.contiguous().to(device)
        return StuckBits(tile_pe_grid(and_t, shape, groups=groups),
                         tile_pe_grid(or_t, shape, groups=groups))

    def stuck_bits(self, model: nn.Module,
                   layer_types: Iterable[str] = ("conv", "linear")) -> dict[str, StuckBits]:
        """Stuck bits per mapped weight, keyed by parameter name ("features.0.weight"), on the
        weight's device. Biases are added outside the array and have no stuck bits."""
        return {
            _weight_param_name(name): self.layer_bits(module.weight.shape, module.weight.device,
                                                      array_groups(module))
            for name, module in mapped_layers(model, layer_types).items()
        }


def pe_stuck_map(faulty: FaultMap | np.ndarray | torch.Tensor, generator: torch.Generator,
                 bits: Iterable[int] | None = None, n_bits: int = 1,
                 polarity: int | str = "random", chip_id: str = "chip",
                 key: str = "pe_stuck_at") -> PeStuckMap:
    """Stuck bits for a given set of faulty PEs: each gets `n_bits` distinct positions drawn
    uniformly from `bits` (None = all eight), each stuck at `polarity` (0, 1 or 'random')."""
    bit_list = check_bits(bits, f"{key}.bits")
    polarity = check_polarity(polarity, f"{key}.polarity")
    generator = _check_generator(generator, key)
    if (isinstance(n_bits, bool) or not isinstance(n_bits, numbers.Integral)
            or not 1 <= n_bits <= len(bit_list)):
        raise ConfigError(
            f"{key}.n_bits: stuck bits per faulty PE must be an integer in 1..{len(bit_list)}, "
            f"got {n_bits!r}"
        )
    grid = _faulty_array(faulty)  # bool [rows, cols], CPU
    pes = grid.reshape(-1).nonzero().squeeze(1)  # [f] flat PE indices
    dev = generator.device
    # [f, len(bits)] random keys; the n_bits smallest per row pick distinct positions
    order = torch.rand(pes.numel(), len(bit_list), generator=generator, device=dev).argsort(1)
    chosen = torch.tensor(bit_list, dtype=torch.int64, device=dev)[order[:, :n_bits]]  # [f, b]
    bit_values = torch.ones_like(chosen) << chosen
    values = _polarity_values(polarity, tuple(chosen.shape), generator)
    and_mask = torch.full(grid.shape, 0xFF, dtype=torch.uint8)
    or_mask = torch.zeros(grid.shape, dtype=torch.uint8)
    and_mask.view(-1)[pes] = (0xFF ^ bit_values.sum(1)).to(torch.uint8).cpu()
    or_mask.view(-1)[pes] = (bit_values * values).sum(1).to(torch.uint8).cpu()
    return PeStuckMap(chip_id, and_mask, or_mask)


def random_pe_stuck_map(geometry: ArrayGeometry, rate: float, generator: torch.Generator,
                        bits: Iterable[int] | None = None, n_bits: int = 1,
                        polarity: int | str = "random", chip_id: str = "chip",
                        key: str = "pe_stuck_at") -> PeStuckMap:
    """A chip with exactly round(rate * rows * cols) faulty PEs at uniformly random distinct
    positions, each with `n_bits` stuck bits (see pe_stuck_map)."""
    rate = check_rate(rate, f"{key}.fault_rate", "fault rate")
    generator = _check_generator(generator, key)
    n_faulty = round(rate * geometry.n_pes)
    chosen = torch.randperm(geometry.n_pes, generator=generator, device=generator.device)
    grid = torch.zeros(geometry.n_pes, dtype=torch.bool)
    grid[chosen[:n_faulty].cpu()] = True
    return pe_stuck_map(grid.view(geometry.shape), generator, bits, n_bits, polarity, chip_id,
                        key)


# --------------------------------------------------------------------------- stuck-at map files
#
# One chip's stuck-at map, chip id = file stem, in either of two formats:
#   .csv  header `row,col,bit,value`, then one line per stuck bit: PE row and col, bit position
#         0 (LSB) .. 7 (sign), stuck value 0 or 1. Blank lines are ignored; a header alone is a
#         chip without stuck bits. Each (row, col, bit) at most once.
#   .npz  exactly two integer arrays of the array's shape [rows, cols], values 0..255:
#         `stuck_and` (0 bits are stuck) and `stuck_or` (1 bits are stuck at 1, only where
#         stuck_and is 0). No pickled objects.
# A file is read completely and checked before anything is returned; every problem is one line
# naming the file (and line), all of a file's problems are reported together.


def _raise_problems(path: Path, problems: list[str]) -> None:
    if len(problems) == 1:
        raise FaultMapError(problems[0])
    if len(problems) > MAX_LISTED_PROBLEMS:
        more = len(problems) - MAX_LISTED_PROBLEMS
        problems = problems[:MAX_LISTED_PROBLEMS] + [f"{path}: ... and {more} more"]
    raise _problems_error(str(path), problems)


def _stuck_csv(path: Path, geometry: ArrayGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(and_mask, or_mask) [rows, cols] from a `row,col,bit,value` CSV."""
    lines = _csv_lines(path, STUCK_CSV_HEADER)
    limits = (("row", geometry.rows), ("col", geometry.cols), ("bit", N_BITS), ("value", 2))
    problems: list[str] = []
    first: dict[tuple[int, int, int], tuple[int, int]] = {}  # cell -> (line, value)
    cells: list[tuple[int, int, int, int]] = []
    for line_no, row in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line
        where = f"{path} line {line_no}"
        if len(row) != len(STUCK_CSV_HEADER):
            problems.append(f"{where}: expected 'row,col,bit,value', got {','.join(row)!r}")
            continue
        numbers_: list[int] = []
        for (name, size), text in zip(limits, row):
            if not re.fullmatch(r"-?[0-9]+", text.strip()):   # int() takes "1_0", "١"
                problems.append(f"{where}: {name} {text.strip()!r} is not an integer "
                                f"(digits 0-9 only)")
                break
            value = int(text.strip())
            if not 0 <= value < size:
                if name == "bit":
                    problems.append(f"{where}: bit position {value} out of range 0..7")
                elif name == "value":
                    problems.append(f"{where}: stuck value must be 0 or 1, got {value}")
                else:
                    problems.append(f"{where}: {name} {value} out of range for the configured "
                                    f"{geometry} array (0..{size - 1})")
                break
            numbers_.append(value)
        else:
            r, c, bit, value = numbers_
            if (r, c, bit) in first:
                seen_line, seen_value = first[(r, c, bit)]
                if seen_value == value:
                    problems.append(f"{where}: row {r}, col {c}, bit {bit} already listed on "
                                    f"line {seen_line}")
                else:
                    problems.append(f"{where}: row {r}, col {c}, bit {bit} stuck at {value} "
                                    f"contradicts line {seen_line} (stuck at {seen_value})")
                continue
            first[(r, c, bit)] = (line_no, value)
            cells.append((r, c, bit, value))
    if problems:
        _raise_problems(path, problems)
    # Vectorised from here: [n, 4] (row, col, bit, value); distinct (row, col, bit).
    table = torch.tensor(cells, dtype=torch.int64).reshape(-1, 4)
    pe = table[:, 0] * geometry.cols + table[:, 1]
    bit_values = torch.ones_like(pe) << table[:, 2]
    cleared = torch.zeros(geometry.n_pes, dtype=torch.int64).index_add_(0, pe, bit_values)
    set_ones = torch.zeros(geometry.n_pes, dtype=torch.int64).index_add_(
        0, pe, bit_values * table[:, 3])
    return ((0xFF ^ cleared).to(torch.uint8).view(geometry.shape),
            set_ones.to(torch.uint8).view(geometry.shape))


def _stuck_npz(path: Path, geometry: ArrayGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(and_mask, or_mask) [rows, cols] from an .npz with `stuck_and` and `stuck_or`."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FaultMapError(f"{path}: unreadable stuck-at map ({err.strerror or err})") from None
    if not data.startswith(b"PK"):
        raise FaultMapError(f"{path}: unreadable or corrupt .npz file (not a zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise FaultMapError(f"{path}: unreadable or corrupt .npz file ({reason})") from None
    problems: list[str] = []
    for name in sorted(set(arrays) - set(STUCK_NPZ_ARRAYS)):
        problems.append(f"{path}: unexpected array {name!r} "
                        f"(expected {', '.join(STUCK_NPZ_ARRAYS)})")
    masks: dict[str, np.ndarray] = {}
    for name in STUCK_NPZ_ARRAYS:
        if name not in arrays:
            problems.append(f"{path}: missing array {name!r}")
            continue
        array = arrays[name]
        if array.shape != geometry.shape:
            problems.append(
                f"{path}: {name} has the wrong shape for the configured {geometry} array: "
                f"expected {_shape_text(geometry.shape)}, got {_shape_text(array.shape)}")
        elif array.dtype.kind not in "iu":
            problems.append(f"{path}: {name} must hold integers 0..255, got dtype {array.dtype}")
        else:
            bad = (array < 0) | (array > 0xFF)  # [rows, cols]
            if bad.any():
                r, c = np.argwhere(bad)[0]
                problems.append(f"{path}: {name} values must be 0..255, found "
                                f"{array[r, c].item()!r} at row {r}, col {c}")
            else:
                masks[name] = array.astype(np.uint8)
    if len(masks) == len(STUCK_NPZ_ARRAYS):
        overlap = (masks["stuck_and"] & masks["stuck_or"]) != 0  # [rows, cols]
        if overlap.any():
            r, c = np.argwhere(overlap)[0]
            problems.append(f"{path}: stuck_or sets bits that stuck_and does not clear at row "
                            f"{r}, col {c} ({int(overlap.sum())} PEs)")
    if problems:
        _raise_problems(path, problems)
    return (torch.from_numpy(masks["stuck_and"].copy()),
            torch.from_numpy(masks["stuck_or"].copy()))


def read_pe_stuck_file(path: str | os.PathLike, geometry: ArrayGeometry) -> PeStuckMap:
    """One chip's stuck-at map from .csv (`row,col,bit,value`) or .npz (`stuck_and`,
    `stuck_or`); chip id = file stem. See the format notes above."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in STUCK_SUFFIXES:
        raise FaultMapError(f"{path}: unsupported stuck-at map file type; use .csv or .npz")
    chip_id = validate_chip_id(path.stem, source=str(path))
    if not path.is_file():
        raise FaultMapError(f"{path}: {not_a_file_reason(path)}")
    reader = _stuck_csv if suffix == ".csv" else _stuck_npz
    and_mask, or_mask = reader(path, geometry)
    return PeStuckMap(chip_id, and_mask, or_mask)


def write_pe_stuck_file(stuck_map: PeStuckMap, path: str | os.PathLike) -> Path:
    """Write a chip's stuck-at map as .csv or .npz (by suffix), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in STUCK_SUFFIXES:
        raise FaultMapError(f"{path}: unsupported stuck-at map file type; use .csv or .npz")
    if suffix == ".npz":
        and_np, or_np = stuck_map.and_mask.numpy(), stuck_map.or_mask.numpy()
        return write_file(path, lambda tmp: np.savez(tmp, stuck_and=and_np, stuck_or=or_np))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(STUCK_CSV_HEADER)
    writer.writerows(stuck_bit_list(stuck_map))
    return write_file(path, lambda tmp: tmp.write_text(text.getvalue(), encoding="utf-8"))


def stuck_bit_list(stuck_map: PeStuckMap) -> list[tuple[int, int, int, int]]:
    """(row, col, bit, value) of every stuck bit, by row, col, then bit: the CSV lines."""
    shifts = torch.arange(N_BITS, dtype=torch.uint8)
    stuck = ((~stuck_map.and_mask).unsqueeze(-1) >> shifts) & 1  # [rows, cols, 8]
    value = (stuck_map.or_mask.unsqueeze(-1) >> shifts) & 1      # [rows, cols, 8]
    cells = stuck.nonzero()                                      # [n, 3] row, col, bit
    table = torch.cat([cells, value[stuck.bool()].long().unsqueeze(1)], dim=1)  # [n, 4]
    return [tuple(line) for line in table.tolist()]

"""Bit-level faults on int8 weights: hand-computed two's-complement cases, flip rates within a
binomial bound, stuck cells that never change, PE-level stuck bits on exactly the weights of
faulty PEs, stuck-at map files and one-line errors."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from reduce_ops.errors import ConfigError, FaultMapError
from reduce_ops.hardware import ArrayGeometry, build_masks, uniform_fault_map
from reduce_ops.hardware.bitfaults import (
    BitFlips,
    PeStuckMap,
    StuckBits,
    bit_flip,
    check_bits,
    check_rate,
    draw_bit_flips,
    draw_model_bit_flips,
    pe_stuck_map,
    popcount,
    random_pe_stuck_map,
    read_pe_stuck_file,
    sample_cells,
    stuck_at,
    stuck_bit_list,
    write_pe_stuck_file,
)

GEOM4 = ArrayGeometry(4, 4)
SIGMAS = 4.0  # binomial bound of the statistical checks


def gen(seed: int = 0) -> torch.Generator:
    """A fault-seed generator, apart from any training seed."""
    return torch.Generator().manual_seed(seed)


def int8(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int8)


def random_int8(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=gen(seed), dtype=torch.int16).to(torch.int8)


def bits_of(q: torch.Tensor) -> torch.Tensor:
    """[..., 8] 0/1 bits of int8 values, LSB first."""
    return (q.view(torch.uint8).unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1


def within_binomial(count: int, n: int, p: float) -> bool:
    """count is within SIGMAS standard deviations of Binomial(n, p)'s mean."""
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p)) + 1e-9


def small_model() -> nn.Module:
    """Conv + Linear with biases; the conv is smaller than, the linear larger than a 4x4 array."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 5, 2), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 6))


# --- two's complement by hand -----------------------------------------------------------------


def test_hand_computed_bit_flips():
    # +127 = 0111_1111: the sign bit flipped reads 1111_1111 = -1; -128 with its LSB flipped
    # reads -127; 0 with bit 6 flipped reads 64; two bits of one byte flip together.
    flips = BitFlips((4,), torch.tensor([0, 1, 2, 3]), torch.tensor([0x80, 0x01, 0x40, 0x81],
                     dtype=torch.uint8), 5)
    assert torch.equal(flips.apply(int8(127, -128, 0, 1)), int8(-1, -127, 64, -128))
    # BER 1 flips every bit: ~x = -x - 1
    q = int8(127, -128, 0, -1, 5)
    faulty, n = bit_flip(q, 1.0, gen())
    assert n == 8 * 5 and torch.equal(faulty, int8(-128, 127, -1, 0, -6))
    assert torch.equal(q, int8(127, -128, 0, -1, 5))  # the stored tensor is untouched


def test_hand_computed_stuck_bits():
    # stuck-at-1 on bit 6 of 0 reads 64; stuck-at-0 on the sign bit of -1 reads 127
    assert torch.equal(StuckBits(torch.tensor([0xBF], dtype=torch.uint8),
                                 torch.tensor([0x40], dtype=torch.uint8)).apply(int8(0)), int8(64))
    masks, n = stuck_at((3,), 1.0, 0, gen(), bits=[7])
    assert n == 3 and torch.equal(masks.apply(int8(-1, -128, 5)), int8(127, 0, 5))
    masks, n = stuck_at((3,), 1.0, 1, gen(), bits=[6])
    assert n == 3 and torch.equal(masks.apply(int8(0, -1, -128)), int8(64, -1, -64))
    masks, _ = stuck_at((2,), 1.0, 1, gen(), bits=[7, 0])  # sign and LSB stuck at 1
    assert torch.equal(masks.apply(int8(0, 126)), int8(-127, -1))


# --- bit flips ----------------------------------------------------------------------------------


def test_ber_zero_flips_nothing():
    q = random_int8((64, 3, 3, 3))
    faulty, n = bit_flip(q, 0.0, gen())
    assert n == 0 and torch.equal(faulty, q) and faulty.data_ptr() != q.data_ptr()


@pytest.mark.parametrize("ber", [1e-3, 0.02, 0.3, 0.7])
def test_flip_fraction_matches_ber_within_binomial_bound(ber):
    q = random_int8((400, 250))  # 800k bits
    faulty, n = bit_flip(q, ber, gen(3))
    changed = bits_of(q) != bits_of(faulty)  # [400, 250, 8]
    n_bits = changed.numel()
    assert int(changed.sum()) == n  # the count returned is the bits actually flipped
    assert within_binomial(n, n_bits, ber)
    for bit in range(8):  # every bit position, sign included, at the same rate
        assert within_binomial(int(changed[..., bit].sum()), n_bits // 8, ber)
    # bytes with 2+ flips: independent bits give 1 - (1-p)^8 - 8p(1-p)^7 of the bytes
    p2 = 1 - (1 - ber) ** 8 - 8 * ber * (1 - ber) ** 7
    assert within_binomial(int((changed.sum(-1) >= 2).sum()), q.numel(), p2)


def test_flips_are_reproducible_from_the_fault_seed_and_fresh_per_draw():
    shape = (32, 16, 3, 3)
    first, second = draw_bit_flips(shape, 0.01, gen(5)), draw_bit_flips(shape, 0.01, gen(5))
    assert torch.equal(first.index, second.index) and torch.equal(first.xor, second.xor)
    g = gen(5)
    trial_a, trial_b = draw_bit_flips(shape, 0.01, g), draw_bit_flips(shape, 0.01, g)
    assert not torch.equal(trial_a.index, trial_b.index)


def test_in_place_flips_undo_exactly_and_out_buffer_is_reused():
    q = random_int8((50, 40))
    stored = q.clone()
    flips = draw_bit_flips(q.shape, 0.05, gen())
    flips.apply_(q)
    assert torch.equal(q, flips.apply(stored))
    flips.apply_(q)
    assert torch.equal(q, stored)
    out = torch.empty_like(q)
    faulty, n = bit_flip(q, 0.05, gen(9), out=out)
    assert faulty.data_ptr() == out.data_ptr() and n > 0
    assert torch.equal(faulty, bit_flip(q, 0.05, gen(9))[0])


def test_sample_cells_distinct_sorted_and_exact_at_the_ends():
    for p in (0.0, 0.1, 0.6, 1.0):
        cells = sample_cells(1000, p, gen())
        assert torch.equal(cells, torch.unique(cells)) and cells.dtype == torch.int64
        assert cells.numel() == 0 or (cells.min() >= 0 and cells.max() < 1000)
    assert sample_cells(1000, 1.0, gen()).numel() == 1000
    assert sample_cells(0, 0.5, gen()).numel() == 0


def test_model_bit_flips_cover_every_weight_at_the_ber():
    model = small_model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")}
    flips = draw_model_bit_flips(shapes, 0.05, gen())
    assert set(flips) == {"0.weight", "3.weight"}
    n_bits = 8 * sum(math.prod(s) for s in shapes.values())
    assert within_binomial(sum(f.n_flipped for f in flips.values()), n_bits, 0.05)


# --- stuck-at cells -----------------------------------------------------------------------------


@pytest.mark.parametrize("polarity", [0, 1, "random"])
def test_stuck_cells_never_change_and_ignore_the_stored_value(polarity):
    shape = (30, 20, 3)
    masks, n = stuck_at(shape, 0.1, polarity, gen(2), bits=[0, 3, 7])
    stuck = bits_of(masks.and_mask.view(torch.int8)) == 0  # [..., 8] stuck cells
    forced = bits_of(masks.or_mask.view(torch.int8))       # their values
    assert int(stuck.sum()) == n == masks.n_stuck
    assert not stuck[..., [1, 2, 4, 5, 6]].any()  # only the chosen positions
    assert within_binomial(n, 3 * math.prod(shape), 0.1)
    if polarity != "random":
        assert torch.equal(forced[stuck], torch.full((n,), polarity, dtype=torch.uint8))
    else:
        assert within_binomial(int(forced[stuck].sum()), n, 0.5)
    q = random_int8(shape)
    for stored in (q, ~q, torch.zeros_like(q), torch.full_like(q, -1)):
        reads = [masks.apply(stored), masks.apply(stored)]
        assert torch.equal(reads[0], reads[1])  # every read the same
        read_bits, stored_bits = bits_of(reads[0]), bits_of(stored)
        assert torch.equal(read_bits[stuck], forced[stuck])       # forced whatever was stored
        assert torch.equal(read_bits[~stuck], stored_bits[~stuck])  # the rest as stored
    in_place = q.clone()
    assert torch.equal(masks.apply_(in_place), masks.apply(q)) and torch.equal(in_place,
                                                                              masks.apply(q))


def test_stuck_masks_must_be_consistent():
    with pytest.raises(FaultMapError, match="or_mask sets bits"):
        StuckBits(torch.tensor([0xFF], dtype=torch.uint8), torch.tensor([1], dtype=torch.uint8))
    with pytest.raises(FaultMapError, match="two uint8 tensors"):
        StuckBits(torch.tensor([0xFF], dtype=torch.uint8), torch.tensor([0]))
    masks, _ = stuck_at((2, 3), 0.5, 1, gen())
    with pytest.raises(FaultMapError, match="shape 2x3 applied to weights of shape 3x2"):
        masks.apply(random_int8((3, 2)))
    with pytest.raises(FaultMapError, match="must be an int8 tensor, got torch.float32"):
        masks.apply(torch.zeros(2, 3))


# --- PE-level stuck-at --------------------------------------------------------------------------


def reference_layer_masks(shape: tuple[int, ...], pe_masks: torch.Tensor) -> torch.Tensor:
    """Loop-per-weight definition: W[m, k] gets the masks of PE (k mod rows, m mod cols)."""
    rows, cols = pe_masks.shape
    m_total, k_total = shape[0], math.prod(shape[1:])
    out = torch.empty(m_total, k_total, dtype=torch.uint8)
    for m, k in itertools.product(range(m_total), range(k_total)):
        out[m, k] = pe_masks[k % rows, m % cols]
    return out.view(shape)


def test_pe_stuck_bits_tile_like_the_mapping():
    chip = random_pe_stuck_map(GEOM4, 0.5, gen(4), n_bits=3)
    for shape in [(5, 6), (5, 2, 2, 2), (3, 2), (9, 3, 3, 3)]:
        bits = chip.layer_bits(shape)
        assert torch.equal(bits.and_mask, reference_layer_masks(shape, chip.and_mask))
        assert torch.equal(bits.or_mask, reference_layer_masks(shape, chip.or_mask))


def test_pe_stuck_at_touches_exactly_the_weights_of_faulty_pes():
    model = small_model()
    chip = random_pe_stuck_map(GEOM4, 0.25, gen(1), n_bits=2, polarity="random")
    assert chip.n_faulty == 4 and chip.n_stuck == 8
    keep = build_masks(model, chip.faulty)  # True = the weight's PE is fault-free
    stuck = chip.stuck_bits(model)
    assert set(stuck) == set(keep) == {"0.weight", "3.weight"}  # no biases
    for name, param in model.named_parameters():
        if name not in keep:
            continue
        q = random_int8(tuple(param.shape), seed=len(name))
        # a stuck bit differs from q or from ~q, so together they show every touched weight
        changed = (stuck[name].apply(q) != q) | (stuck[name].apply(~q) != ~q)
        assert torch.equal(changed, ~keep[name])
        untouched = keep[name]
        assert torch.equal(stuck[name].apply(q)[untouched], q[untouched])  # bit-identical


def test_pe_stuck_map_from_a_fault_map_keeps_its_pes():
    fault_map = uniform_fault_map(ArrayGeometry(8, 8), 0.25, seed=3)
    chip = pe_stuck_map(fault_map, gen(), bits=[5, 6, 7], n_bits=2, polarity=1)
    assert torch.equal(chip.faulty, torch.from_numpy(fault_map.faulty.copy()))
    cleared = ~chip.and_mask[chip.faulty]
    assert all(popcount(c.view(1)) == 2 for c in cleared)  # two stuck bits per faulty PE
    assert not (cleared & 0b0001_1111).any()               # only bits 5..7
    assert torch.equal(chip.or_mask[chip.faulty], cleared)  # all stuck at 1
    assert (chip.and_mask[~chip.faulty] == 0xFF).all() and (chip.or_mask[~chip.faulty] == 0).all()


def test_pe_stuck_generator_is_exact_and_reproducible():
    geometry = ArrayGeometry(16, 8)
    for rate in (0.0, 0.1, 1.0):
        chip = random_pe_stuck_map(geometry, rate, gen(7))
        assert chip.n_faulty == round(rate * 128) and chip.n_stuck == chip.n_faulty
        assert chip == random_pe_stuck_map(geometry, rate, gen(7))
    assert random_pe_stuck_map(geometry, 0.5, gen(7)) != random_pe_stuck_map(geometry, 0.5, gen(8))


# --- bad arguments: one line naming the key -----------------------------------------------------


@pytest.mark.parametrize("call, message", [
    (lambda: check_rate(1.5, "robustness.bers[2]"),
     "robustness.bers[2]: BER must be in [0, 1], got 1.5"),
    (lambda: draw_bit_flips((2, 2), -0.1, gen(), key="robustness.bers[0]"),
     "robustness.bers[0]: BER must be in [0, 1], got -0.1"),
    (lambda: bit_flip(int8(1), float("nan"), gen()), "ber: BER must be in [0, 1], got nan"),
    (lambda: bit_flip(int8(1), True, gen()), "ber: BER must be in [0, 1], got True"),
    (lambda: check_bits([0, 9], "robustness.bits"),
     "robustness.bits: bit position 9 out of range 0..7"),
    (lambda: stuck_at((2,), 0.1, 0, gen(), bits=[3, 3]),
     "stuck_at.bits: bit position 3 listed twice"),
    (lambda: stuck_at((2,), 0.1, 0, gen(), bits=[]), "stuck_at.bits: no bit positions given"),
    (lambda: stuck_at((2,), 0.1, 2, gen()),
     "stuck_at.polarity: polarity must be 0, 1 or 'random', got 2"),
    (lambda: stuck_at((2,), 2, 0, gen()),
     "stuck_at: stuck-at fraction must be in [0, 1], got 2"),
    (lambda: draw_bit_flips((2,), 0.1, 0), "ber: faults need an explicit torch.Generator"),
    (lambda: random_pe_stuck_map(GEOM4, 0.1, gen(), n_bits=9, key="chip"),
     "chip.n_bits: stuck bits per faulty PE must be an integer in 1..8, got 9"),
    (lambda: random_pe_stuck_map(GEOM4, 1.2, gen()),
     "pe_stuck_at.fault_rate: fault rate must be in [0, 1], got 1.2"),
])
def test_bad_arguments_are_one_config_line_naming_the_key(call, message):
    with pytest.raises(ConfigError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and text.startswith(message), text


# --- stuck-at map files -------------------------------------------------------------------------


def test_csv_by_hand_and_round_trips(tmp_path):
    path = tmp_path / "chip-7.csv"
    path.write_text("row,col,bit,value\n0,3,7,0\n0,3,0,1\n\n2,1,6,1\n")
    chip = read_pe_stuck_file(path, GEOM4)
    assert chip.chip_id == "chip-7" and chip.n_faulty == 2 and chip.n_stuck == 3
    assert chip.and_mask[0, 3] == 0b0111_1110 and chip.or_mask[0, 3] == 0b0000_0001
    assert chip.and_mask[2, 1] == 0b1011_1111 and chip.or_mask[2, 1] == 0b0100_0000
    assert stuck_bit_list(chip) == [(0, 3, 0, 1), (0, 3, 7, 0), (2, 1, 6, 1)]
    random_chip = random_pe_stuck_map(GEOM4, 0.5, gen(), n_bits=4, chip_id="chip-8")
    for suffix in (".csv", ".npz"):
        written = write_pe_stuck_file(random_chip, tmp_path / f"chip-8{suffix}")
        assert read_pe_stuck_file(written, GEOM4) == random_chip
    (tmp_path / "clean.csv").write_text("row,col,bit,value\n")
    assert read_pe_stuck_file(tmp_path / "clean.csv", GEOM4).n_faulty == 0


def _text(text):
    return lambda path: path.write_text(text)


def _npz(**arrays):
    return lambda path: np.savez(path, **arrays)


def _npy_bytes(array):
    def write(path):
        with open(path, "wb") as handle:  # .npy content under an .npz name
            np.save(handle, array)
    return write


FF = np.full((4, 4), 0xFF, dtype=np.uint8)
ZERO = np.zeros((4, 4), dtype=np.uint8)
OVERLAP = ZERO.copy()
OVERLAP[1, 2] = 0x10  # stuck_or bit 4 where stuck_and keeps bit 4

BAD_FILES = [
    ("c7.csv", _text("row,col,bit,value\n4,0,1,1\n"), r"line 2: row 4 out of range .*0\.\.3"),
    ("c7.csv", _text("row,col,bit,value\n0,5,1,1\n"), r"line 2: col 5 out of range"),
    ("c7.csv", _text("row,col,bit,value\n0,0,9,1\n"),
     r"line 2: bit position 9 out of range 0\.\.7"),
    ("c7.csv", _text("row,col,bit,value\n0,0,-1,1\n"), r"line 2: bit position -1 out of range"),
    ("c7.csv", _text("row,col,bit,value\n0,0,1,2\n"), r"line 2: stuck value must be 0 or 1, got 2"),
    ("c7.csv", _text("row,col,bit,value\n0,0,x,1\n"), r"line 2: bit 'x' is not an integer"),
    ("c7.csv", _text("row,col,bit,value\n0,0,1\n"), r"line 2: expected 'row,col,bit,value'"),
    ("c7.csv", _text("row,col,bit,value\n1,2,3,1\n1,2,3,1\n"),
     r"line 3: row 1, col 2, bit 3 already listed on line 2"),
    ("c7.csv", _text("row,col,bit,value\n1,2,3,0\n\n1,2,3,1\n"),
     r"line 4: row 1, col 2, bit 3 stuck at 1 contradicts line 2 \(stuck at 0\)"),
    ("c7.csv", _text("row,col\n1,2\n"), r"first line must be the header 'row,col,bit,value'"),
    ("c7.csv", _text(""), r"header 'row,col,bit,value', got 'an empty file'"),
    ("c7.csv", lambda p: p.write_bytes(b"row,col,bit,value\n\xff\xfe"), r"unreadable or corrupt"),
    ("c7.npz", _npz(stuck_and=np.full((3, 4), 0xFF), stuck_or=ZERO),
     r"stuck_and has the wrong shape .*expected 4x4, got 3x4"),
    ("c7.npz", _npz(stuck_and=FF, stuck_or=np.zeros((4, 4), dtype=np.float32)),
     r"stuck_or must hold integers 0\.\.255, got dtype float32"),
    ("c7.npz", _npz(stuck_and=np.full((4, 4), 256), stuck_or=ZERO),
     r"stuck_and values must be 0\.\.255, found 256 at row 0, col 0"),
    ("c7.npz", _npz(stuck_and=FF), r"missing array 'stuck_or'"),
    ("c7.npz", _npz(stuck_and=FF, stuck_or=ZERO, extra=ZERO), r"unexpected array 'extra'"),
    ("c7.npz", _npz(stuck_and=FF, stuck_or=OVERLAP),
     r"stuck_or sets bits that stuck_and does not clear at row 1, col 2 \(1 PEs\)"),
    ("c7.npz", lambda p: p.write_bytes(b"PK\x03\x04 broken"), r"unreadable or corrupt \.npz"),
    ("c7.npz", _npy_bytes(FF), r"not a zip archive"),
    ("c7.npy", _npz(stuck_and=FF, stuck_or=ZERO), r"unsupported stuck-at map file type"),
    ("-c7.csv", _text("row,col,bit,value\n"), r"unsafe chip id '-c7'"),
]


@pytest.mark.parametrize("name, write, message", BAD_FILES, ids=[m for _, _, m in BAD_FILES])
def test_each_bad_stuck_file_is_one_line_naming_the_file(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FaultMapError) as err:
        read_pe_stuck_file(path, GEOM4)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path)), text
    assert re.search(message, text), text
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_all_problems_of_a_file_are_listed_together(tmp_path):
    path = tmp_path / "c8.csv"
    path.write_text("row,col,bit,value\n9,0,0,1\n0,0,8,1\n0,0,0,1\n0,0,0,0\n")
    with pytest.raises(FaultMapError) as err:
        read_pe_stuck_file(path, GEOM4)
    summary, *problems = str(err.value).splitlines()
    assert summary == f"3 problems with {path}:"
    assert [p.split(": ")[0].strip() for p in problems] == [
        f"{path} line {n}" for n in (2, 3, 5)]


def test_pe_stuck_map_rejects_inconsistent_masks():
    with pytest.raises(FaultMapError, match="two non-empty 2-D uint8"):
        PeStuckMap("c1", torch.full((4, 4), 0xFF, dtype=torch.uint8),
                   torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(FaultMapError, match="or_mask sets bits"):
        PeStuckMap("c1", torch.full((4, 4), 0xFF, dtype=torch.uint8),
                   torch.ones(4, 4, dtype=torch.uint8))

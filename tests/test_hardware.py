"""Systolic-array fault model: hand-computed masks, FAP invariants, generators, fleet I/O."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from torch import nn

from reduce_ops.errors import FaultMapError
from reduce_ops.hardware import (
    GENERATORS,
    ArrayGeometry,
    FaultMap,
    apply_masks,
    build_masks,
    clustered_fault_map,
    fleetio,
    generate_fleet,
    import_fault_maps,
    layer_keep_mask,
    load_fleet,
    mapped_layers,
    pruned_fraction,
    read_fault_map_file,
    sample_fleet_rates,
    uniform_fault_map,
    validate_chip_id,
    write_fleet,
)

GEOM4 = ArrayGeometry(4, 4)


def faulty_4x4(*pes: tuple[int, int]) -> torch.Tensor:
    """A 4x4 fault map with the given (row, col) PEs faulty."""
    faulty = torch.zeros(4, 4, dtype=torch.bool)
    for r, c in pes:
        faulty[r, c] = True
    return faulty


def small_model() -> nn.Module:
    """Conv + BatchNorm + Linear with biases: only the conv and linear weights are mapped."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    ).eval()


def reference_keep_mask(shape: tuple[int, ...], faulty: torch.Tensor,
                        groups: int = 1) -> torch.Tensor:
    """Loop-per-weight definition of the mapping, for checking the vectorised one: output
    channel m of group g = m // (M / groups) reads input rows from g * K on."""
    rows, cols = faulty.shape
    m_total, k_total = shape[0], int(np.prod(shape[1:]))
    keep = torch.ones(m_total, k_total, dtype=torch.bool)
    for m, k in itertools.product(range(m_total), range(k_total)):
        g = m // (m_total // groups)
        keep[m, k] = not faulty[(g * k_total + k) % rows, m % cols]
    return keep.view(shape)


# --- geometry and mapping -------------------------------------------------------------------


def test_geometry_validates_and_counts_pes():
    assert ArrayGeometry(256, 128).n_pes == 256 * 128
    assert ArrayGeometry(np.int64(4), 4).rows == 4
    for rows, cols in [(0, 4), (4, -1), (2.5, 4), (True, 4)]:
        with pytest.raises(FaultMapError, match="positive integer"):
            ArrayGeometry(rows, cols)


def test_linear_mask_by_hand_wraps_tiles():
    # Linear(6, 5): W[m, k] is [5, 6]; K=6 > rows=4 and M=5 > cols=4, so k=4,5 and m=4 wrap.
    # Faulty PE (1, 2) hits k in {1, 5} for m=2; PE (3, 0) hits k=3 for m in {0, 4}.
    faulty = faulty_4x4((1, 2), (3, 0))
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 0, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(layer_keep_mask(nn.Linear(6, 5).weight.shape, faulty), expected)


def test_conv_mask_by_hand_uses_in_channel_kh_kw_order():
    # Conv2d(2, 5, 2): weight [5, 2, 2, 2], k = ic * 4 + kh * 2 + kw, K = 8.
    # PE (1, 2): k in {1, 5} = (ic0, kh0, kw1), (ic1, kh0, kw1) for m = 2.
    # PE (3, 0): k in {3, 7} = (ic0, kh1, kw1), (ic1, kh1, kw1) for m in {0, 4}.
    faulty = faulty_4x4((1, 2), (3, 0))
    ones = [[[1, 1], [1, 1]], [[1, 1], [1, 1]]]
    m0 = [[[1, 1], [1, 0]], [[1, 1], [1, 0]]]
    m2 = [[[1, 0], [1, 1]], [[1, 0], [1, 1]]]
    expected = torch.tensor([m0, ones, m2, ones, m0], dtype=torch.bool)
    assert torch.equal(layer_keep_mask(nn.Conv2d(2, 5, 2).weight.shape, faulty), expected)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(9, 7),
        nn.Conv2d(3, 6, 3),
        nn.Conv2d(4, 6, 3, groups=2),  # weight [6, 2, 3, 3]: 2 blocks of 3 x 18
        nn.Conv2d(6, 6, 3, groups=6),  # depthwise: 6 blocks of 1 x 9
        nn.Conv3d(4, 8, 2, groups=4),
        nn.Conv1d(5, 3, 2),
        nn.Linear(2, 3),  # smaller than the array in both directions
    ],
)
def test_vectorised_mask_matches_per_weight_definition(layer):
    faulty = torch.from_numpy(uniform_fault_map(ArrayGeometry(5, 4), 0.4, seed=7).faulty.copy())
    shape = tuple(layer.weight.shape)
    groups = getattr(layer, "groups", 1)
    assert torch.equal(layer_keep_mask(shape, faulty, groups=groups),
                       reference_keep_mask(shape, faulty, groups))
    masks = build_masks(layer, faulty)                     # the layer's own groups
    assert torch.equal(masks["weight"], reference_keep_mask(shape, faulty, groups))


def test_depthwise_mask_by_hand_gives_each_channel_its_own_rows():
    # Depthwise Conv2d(2, 2, 2, groups=2) on an 8 x 4 array: weight [2, 1, 2, 2], K = 4 per
    # group. Channel 0 sits on rows 0-3 of column 0, channel 1 on rows 4-7 of column 1 (the
    # block-diagonal im2col matrix), k_local = kh * 2 + kw.
    # PE (1, 0): channel 0, k 1 = (kh 0, kw 1). PE (6, 1): channel 1, k 6 - 4 = 2 = (kh 1, kw 0).
    # PE (3, 1) is in channel 1's column but on channel 0's rows: it holds no weight.
    faulty = torch.zeros(8, 4, dtype=torch.bool)
    faulty[1, 0] = faulty[6, 1] = faulty[3, 1] = True
    layer = nn.Conv2d(2, 2, 2, groups=2)
    expected = torch.tensor([[[[1, 0], [1, 1]]], [[[1, 1], [0, 1]]]], dtype=torch.bool)
    assert torch.equal(build_masks(layer, faulty)["weight"], expected)
    # without groups (the matrix reshaped [M, K_g]) channel 1 would sit on rows 0-3
    assert not torch.equal(layer_keep_mask(layer.weight.shape, faulty), expected)


def test_stuck_bits_of_a_depthwise_conv_sit_where_its_mask_does() -> None:
    from reduce_ops.hardware.bitfaults import pe_stuck_map

    faulty = uniform_fault_map(ArrayGeometry(8, 4), 0.3, seed=2)
    stuck = pe_stuck_map(faulty, torch.Generator().manual_seed(0), n_bits=2)
    layer = nn.Conv2d(6, 6, 3, groups=6)
    bits = stuck.stuck_bits(layer)["weight"]
    keep = build_masks(layer, faulty)["weight"]
    assert torch.equal((bits.and_mask != 255) | (bits.or_mask != 0), ~keep)


def test_excluded_layers_are_off_the_array_and_listed_once() -> None:
    from reduce_ops.errors import ConfigError
    from reduce_ops.hardware import leave_off_array, unmapped_layers

    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(1, 4, 3))
    model.add_module("bn", nn.BatchNorm2d(4))
    model.add_module("up", nn.ConvTranspose2d(4, 4, 2))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    model.add_module("emb", nn.Embedding(5, 4))
    assert set(mapped_layers(model)) == {"stem", "head.1"}
    assert unmapped_layers(model) == {"up": "ConvTranspose2d, cannot be mapped",
                                      "emb": "Embedding, cannot be mapped"}
    assert leave_off_array(model, ["head"]) == ["head.1"]         # a container: what is in it
    assert set(mapped_layers(model)) == {"stem"}
    assert set(build_masks(model, faulty_4x4((0, 0)))) == {"stem.weight"}
    assert unmapped_layers(model)["head.1"] == "Linear, hardware.exclude_layers"
    assert unmapped_layers(model, ("conv",))["head.1"] == "Linear, hardware.exclude_layers"
    assert set(mapped_layers(__import__("copy").deepcopy(model))) == {"stem"}   # kept by copies
    with pytest.raises(ConfigError, match=r"hardware.exclude_layers: no layer 'stme' in the "
                                          r"model \(did you mean 'stem'\?\)"):
        leave_off_array(model, ["stme"])
    with pytest.raises(ConfigError, match="'head.0' .* has no weights"):
        leave_off_array(model, ["head.0"])


def test_build_masks_keys_are_mapped_weight_parameter_names():
    model = small_model()
    masks = build_masks(model, np.zeros((4, 4), dtype=bool))
    assert set(masks) == {"0.weight", "4.weight"}  # no biases, no BatchNorm
    assert set(mapped_layers(model)) == {"0", "4"}
    assert set(mapped_layers(model, ("linear",))) == {"4"}
    for name, param in model.named_parameters():
        if name in masks:
            assert masks[name].shape == param.shape and masks[name].dtype == torch.bool


def test_build_masks_reuses_out_buffers_in_place():
    model = small_model()
    first = build_masks(model, uniform_fault_map(GEOM4, 0.5, seed=1))
    storage = {name: mask.data_ptr() for name, mask in first.items()}
    second_map = uniform_fault_map(GEOM4, 0.5, seed=2)
    reused = build_masks(model, second_map, out=first)
    fresh = build_masks(model, second_map)
    for name, mask in reused.items():
        assert mask.data_ptr() == storage[name] and torch.equal(mask, fresh[name])
    with pytest.raises(FaultMapError, match="mask buffer"):
        layer_keep_mask((5, 6), faulty_4x4(), out=torch.ones(6, 5, dtype=torch.bool))


def test_build_masks_on_a_bare_layer_and_unknown_layer_type():
    assert set(build_masks(nn.Linear(3, 2), faulty_4x4())) == {"weight"}
    with pytest.raises(FaultMapError, match="'attention'"):
        mapped_layers(small_model(), ("conv", "attention"))


def test_pruned_fraction_equals_fault_rate_when_layer_tiles_the_array():
    model = nn.Sequential(nn.Linear(8, 12), nn.Conv2d(2, 4, 2))  # K, M multiples of 4
    for rate in (0.0, 0.25, 0.5, 1.0):
        fault_map = uniform_fault_map(GEOM4, rate, seed=1)
        assert pruned_fraction(build_masks(model, fault_map)) == pytest.approx(fault_map.fault_rate)
    assert pruned_fraction({}) == 0.0


def test_pruned_fraction_differs_from_fault_rate_for_small_layers():
    # Linear(2, 2) uses only PEs (0..1, 0..1); a fault elsewhere prunes nothing.
    masks = build_masks(nn.Linear(2, 2), faulty_4x4((3, 3)))
    assert pruned_fraction(masks) == 0.0


# --- FAP invariants (golden vs faulty) ---------------------------------------------------------


def test_rate_zero_changes_nothing():
    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    golden = model(x)
    apply_masks(model, build_masks(model, uniform_fault_map(GEOM4, 0.0, seed=0)))
    assert torch.equal(model(x), golden)


def test_rate_one_zeroes_every_mapped_weight_and_no_bias():
    model = small_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    masks = build_masks(model, uniform_fault_map(GEOM4, 1.0, seed=0))
    apply_masks(model, masks)
    for name, param in model.named_parameters():
        if name in masks:
            assert torch.count_nonzero(param) == 0
        else:  # biases and BatchNorm
            assert torch.equal(param, before[name])


def test_fault_changes_output_and_restoring_weights_restores_it_exactly():
    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    golden = model(x)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    masks = build_masks(model, faulty_4x4((0, 1)))
    apply_masks(model, masks)
    assert not torch.equal(model(x), golden)
    for name, param in model.named_parameters():  # masked weights are exactly zero
        if name in masks:
            assert torch.all(param[~masks[name]] == 0)
    model.load_state_dict(saved)
    assert torch.equal(model(x), golden)


def test_apply_masks_rejects_masks_for_another_model():
    with pytest.raises(FaultMapError, match="no parameter"):
        apply_masks(small_model(), {"9.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(FaultMapError, match="shape"):
        apply_masks(small_model(), {"4.weight": torch.ones(2, 2, dtype=torch.bool)})


# --- generators ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_reproducible_and_exact(name):
    make = GENERATORS[name]
    geometry = ArrayGeometry(16, 24)
    assert np.array_equal(make(geometry, 0.3, 5).faulty, make(geometry, 0.3, 5).faulty)
    assert not np.array_equal(make(geometry, 0.3, 5).faulty, make(geometry, 0.3, 6).faulty)
    for rate in (0.0, 0.001, 0.1, 0.37, 0.6, 0.99, 1.0):
        fault_map = make(geometry, rate, seed=11, chip_id="c1")
        assert fault_map.n_faulty == round(rate * geometry.n_pes)
        assert fault_map.geometry == geometry and fault_map.faulty.dtype == np.bool_
    with pytest.raises(FaultMapError, match="fault rate"):
        make(geometry, 1.5, seed=0)


def faulty_neighbour_pairs(faulty: np.ndarray) -> int:
    """Number of horizontally or vertically adjacent faulty PE pairs."""
    return int((faulty[1:, :] & faulty[:-1, :]).sum() + (faulty[:, 1:] & faulty[:, :-1]).sum())


def test_clustered_maps_are_more_clustered_than_uniform():
    geometry = ArrayGeometry(64, 64)
    seeds = range(5)
    uniform = sum(faulty_neighbour_pairs(uniform_fault_map(geometry, 0.1, s).faulty) for s in seeds)
    clustered = sum(
        faulty_neighbour_pairs(clustered_fault_map(geometry, 0.1, s).faulty) for s in seeds
    )
    assert clustered > 2 * uniform


def test_fleet_rates_stay_in_range_and_beta_favours_few_faults():
    uniform = sample_fleet_rates(2000, "uniform", 0.1, 0.5, seed=0)
    beta = sample_fleet_rates(2000, "beta", 0.1, 0.5, seed=0)
    for rates in (uniform, beta):
        assert rates.shape == (2000,) and rates.min() >= 0.1 and rates.max() <= 0.5
    assert np.median(beta) < np.median(uniform)
    assert np.array_equal(beta, sample_fleet_rates(2000, "beta", 0.1, 0.5, seed=0))
    with pytest.raises(FaultMapError, match="'gamma'"):
        sample_fleet_rates(3, "gamma", 0.1, 0.5, seed=0)


def test_generate_fleet_ids_seeds_and_reproducibility():
    geometry = ArrayGeometry(8, 8)
    fleet = generate_fleet(12, geometry, "clustered", "uniform", 0.0, 0.5, seed=3)
    assert [m.chip_id for m in fleet] == [f"chip-{i:03d}" for i in range(12)]
    assert fleet == generate_fleet(12, geometry, "clustered", "uniform", 0.0, 0.5, seed=3)
    assert fleet != generate_fleet(12, geometry, "clustered", "uniform", 0.0, 0.5, seed=4)
    for fault_map in fleet:  # each chip can be rebuilt alone from its recorded seed
        rebuilt = GENERATORS[fault_map.generator](
            geometry, fault_map.fault_rate, fault_map.seed, fault_map.chip_id
        )
        assert rebuilt == fault_map
    big = generate_fleet(1001, ArrayGeometry(1, 1), "uniform", "uniform", 0.0, 1.0, seed=0)
    assert big[-1].chip_id == "chip-1000"
    with pytest.raises(FaultMapError, match="'gaussian'"):
        generate_fleet(2, geometry, "gaussian", "uniform", 0.0, 0.5, seed=3)


@pytest.mark.parametrize("chip_id", ["a", "chip-007", "A_b.c-9", "x" * 64])
def test_safe_chip_ids(chip_id):
    assert validate_chip_id(chip_id) == chip_id


@pytest.mark.parametrize("chip_id", ["", ".", "..", ".hidden", "-rf", "a/b", "a b", "é", "x" * 65])
def test_unsafe_chip_ids(chip_id):
    with pytest.raises(FaultMapError, match="unsafe chip id"):
        validate_chip_id(chip_id, source="maps.csv")


def test_fault_map_rejects_non_bool_and_is_read_only():
    with pytest.raises(FaultMapError, match="bool"):
        FaultMap("c", np.zeros((4, 4), dtype=np.int8))
    fault_map = FaultMap("c", np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError):
        fault_map.faulty[0, 0] = True


# --- fleet on disk ------------------------------------------------------------------------


def test_write_then_load_fleet_round_trip(tmp_path):
    geometry = ArrayGeometry(8, 8)
    fleet = generate_fleet(5, geometry, "clustered", "beta", 0.0, 0.5, seed=3)
    fleet.append(FaultMap("tested-1", np.eye(8, dtype=bool)))  # an imported map, no seed
    out = tmp_path / "fleet"
    write_fleet(fleet, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".reduce-ops-output", "fleet.csv", *(f"{m.chip_id}.npy" for m in fleet)]
    )
    header, *lines = (out / "fleet.csv").read_text().splitlines()
    assert header == "chip_id,fault_rate,n_faulty,generator,seed,sha256"
    assert lines[-1].startswith("tested-1,0.125,8,imported,,")
    assert load_fleet(out, geometry) == fleet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet"]  # no temp dirs left


def test_load_fleet_detects_changed_map_and_wrong_geometry(tmp_path):
    geometry = ArrayGeometry(8, 8)
    write_fleet(generate_fleet(3, geometry, "uniform", "uniform", 0.1, 0.5, seed=0), tmp_path / "f")
    with pytest.raises(FaultMapError, match=r"chip-001\.npy: wrong shape .*expected 4x4, got 8x8"):
        load_fleet(tmp_path / "f", GEOM4)
    np.save(tmp_path / "f" / "chip-001.npy", np.ones((8, 8), dtype=bool))
    with pytest.raises(FaultMapError, match=r"chip-001\.npy: sha256 does not match"):
        load_fleet(tmp_path / "f", geometry)
    with pytest.raises(FaultMapError, match="manifest not found"):
        load_fleet(tmp_path / "missing", geometry)


def test_failed_write_leaves_existing_fleet_untouched(tmp_path, monkeypatch):
    geometry = ArrayGeometry(8, 8)
    out = tmp_path / "fleet"
    old = generate_fleet(3, geometry, "uniform", "uniform", 0.1, 0.5, seed=0)
    write_fleet(old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_npy_bytes = fleetio._npy_bytes
    calls = []

    def fail_on_third(faulty):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_npy_bytes(faulty)

    monkeypatch.setattr(fleetio, "_npy_bytes", fail_on_third)
    new = generate_fleet(4, geometry, "uniform", "uniform", 0.1, 0.5, seed=1)
    with pytest.raises(OSError, match="disk full"):
        write_fleet(new, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fleet"]  # temp dir removed
    with pytest.raises(FaultMapError, match="duplicate chip id"):
        write_fleet([old[0], old[0]], out)
    assert load_fleet(out, geometry) == old


# --- importing a test floor's maps --------------------------------------------------------


def test_import_npy_and_csv_maps(tmp_path):
    src = tmp_path / "floor"
    src.mkdir()
    np.save(src / "b1.npy", np.eye(4, dtype=bool))
    np.save(src / "b2.npy", np.eye(4, dtype=np.float32))  # 0/1 floats are fine
    np.save(src / "b3.npy", np.eye(4, dtype=np.int64))
    (src / "a1.csv").write_text("row,col\n0,3\n2,1\n\n")
    (src / "a2.csv").write_text("row,col\n")  # a perfect chip
    (src / "README.txt").write_text("ignored")
    maps = import_fault_maps(src, GEOM4)
    assert [m.chip_id for m in maps] == ["a1", "a2", "b1", "b2", "b3"]
    assert np.array_equal(maps[0].faulty, faulty_4x4((0, 3), (2, 1)).numpy())
    assert maps[1].n_faulty == 0
    for fault_map in maps[2:]:
        assert np.array_equal(fault_map.faulty, np.eye(4, dtype=bool))
    assert all(m.generator == "imported" and m.seed is None for m in maps)
    assert read_fault_map_file(src / "a1.csv", GEOM4) == maps[0]


def _npy(array):
    return lambda path: np.save(path, array)


def _text(text):
    return lambda path: path.write_text(text)


BAD_FILES = [
    ("c7.npy", _npy(np.zeros((3, 4), dtype=bool)), r"wrong shape .*expected 4x4, got 3x4"),
    ("c7.npy", _npy(np.zeros((4, 4, 1), dtype=bool)), r"expected 4x4, got 4x4x1"),
    ("c7.npy", _npy(np.full((4, 4), 2)), r"values must be 0 or 1, found 2"),
    ("c7.npy", _npy(np.full((4, 4), 0.5)), r"values must be 0 or 1"),
    ("c7.npy", _npy(np.full((4, 4), np.nan)), r"NaN"),
    ("c7.npy", _npy(np.array([["a"] * 4] * 4)), r"must be bool or 0/1 numbers"),
    ("c7.npy", lambda p: p.write_bytes(b"not numpy at all"), r"unreadable or corrupt"),
    ("c7.npy", lambda p: p.write_bytes(np.lib.format.MAGIC_PREFIX + b"\x01\x00"), r"corrupt"),
    ("c7.csv", _text("row,col\n1,1\n4,0\n"), r"line 3: row 4 out of range .*0\.\.3"),
    ("c7.csv", _text("row,col\n1,9\n"), r"line 2: col 9 out of range"),
    ("c7.csv", _text("row,col\n-1,0\n"), r"line 2: row -1 is negative"),
    ("c7.csv", _text("row,col\n1.5,0\n"), r"line 2: row '1\.5' is not an integer"),
    ("c7.csv", _text("row,col\n1,2,3\n"), r"line 2: expected 'row,col'"),
    ("c7.csv", _text("1,2\n"), r"header 'row,col'"),
    ("c7.csv", _text(""), r"header 'row,col'"),
    ("c7.csv", _text("row,col\n1,2\n1,2\n"), r"line 3: PE 1,2 already listed on line 2"),
    ("c7.csv", lambda p: p.write_bytes(b"row,col\n\xff\xfe\x00"), r"unreadable or corrupt"),
    ("-c7.npy", _npy(np.zeros((4, 4), dtype=bool)), r"unsafe chip id '-c7'"),
    ("c 7.csv", _text("row,col\n"), r"unsafe chip id 'c 7'"),
]


@pytest.mark.parametrize("name, write, message", BAD_FILES, ids=[m for _, _, m in BAD_FILES])
def test_each_bad_map_gets_one_clear_line_naming_the_file(tmp_path, name, write, message):
    src = tmp_path / "floor"
    src.mkdir()
    np.save(src / "good.npy", np.zeros((4, 4), dtype=bool))
    write(src / name)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(FaultMapError) as err:
        import_fault_maps(src, GEOM4)
    summary, *problems = str(err.value).splitlines()
    assert summary == f"1 problem with the fault maps in {src}:"
    assert len(problems) == 1 and name in problems[0]
    assert re.search(message, problems[0]), problems[0]
    with pytest.raises(FaultMapError, match=message):
        read_fault_map_file(src / name, GEOM4)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_all_problems_are_reported_together(tmp_path):
    src = tmp_path / "floor"
    src.mkdir()
    np.save(src / "a.npy", np.zeros((4, 4), dtype=bool))
    (src / "a.csv").write_text("row,col\n")
    np.save(src / "b.npy", np.zeros((5, 5), dtype=bool))
    (src / "c.csv").write_text("row,col\n0,7\n")
    with pytest.raises(FaultMapError) as err:
        import_fault_maps(src, GEOM4)
    summary, *problems = str(err.value).splitlines()
    assert summary.startswith("3 problems")
    assert any("duplicate chip id 'a'" in p and "a.csv, a.npy" in p for p in problems)
    assert any("b.npy" in p and "wrong shape" in p for p in problems)
    assert any("c.csv line 2" in p for p in problems)


def test_import_rejects_missing_or_empty_source(tmp_path):
    with pytest.raises(FaultMapError, match="not a directory"):
        import_fault_maps(tmp_path / "nope", GEOM4)
    (tmp_path / "notes.txt").write_text("no maps here")
    with pytest.raises(FaultMapError, match=r"no fault maps found \(expected \.npy or \.csv"):
        import_fault_maps(tmp_path, GEOM4)

"""Chips and trials trained as one computation (`execution.batch`, reduce_ops.batched): every
chip's weights within float rounding of its own one-by-one FAT run, for every zoo model; a chip
handed on trains on as if it had been alone from the start; a model or hardware the batched
computation does not know trains one by one; resilience and compare give the trials and curves
of one by one."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import (
    THROUGH_GROUP,
    WAFER_FLEET,
    fat_and_compare,
    grid_trials,
    tiny_params,
    trained_chips,
)
from torch import nn
from torch.nn import functional as F

from reduce_ops import resilience
from reduce_ops.batched import CPU_MAX_MFLOP, BatchedFat, batch_size, chunks
from reduce_ops.config import ExecutionConfig, FatConfig, from_dict
from reduce_ops.data import load_prepared
from reduce_ops.fault_aware import FatSession
from reduce_ops.grouped_conv import WideInputGrad, vector_width
from reduce_ops.hardware import ArrayGeometry, uniform_fault_map
from reduce_ops.models import build_model
from reduce_ops.records import trials as trials_record
from reduce_ops.stacked import batchable, forward_flops, stackable

FAT = FatConfig("sgd", 0.003, 0.9, 0.0005, 32, 0)
LAYERS = ["conv", "linear"]


def _random_data(shape: tuple[int, ...], n: int = 128) -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(x={s: torch.randn(n, *shape, generator=g) for s in
                              ("train", "val", "test")},
                           y={s: torch.randint(0, 10, (n,), generator=g) for s in
                              ("train", "val", "test")})


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


@pytest.mark.parametrize(("name", "shape", "steps", "tol"), [
    ("lenet", (1, 8, 8), 8, 1e-6), ("lenet-bn", (1, 8, 8), 8, 1e-5), ("mlp", (1, 8, 8), 8, 1e-6),
    # ResNet-18's BatchNorm over 8x8 maps amplifies the rounding: 1e-6 to 1.05e-4 measured over
    # seeds and chips, against 0.45-0.5 between two chips' weights after the same steps
    ("vgg11", (3, 8, 8), 4, 1e-5), ("resnet18", (3, 8, 8), 2, 5e-4)])
def test_each_chip_trains_as_it_would_alone(name: str, shape: tuple[int, ...], steps: int,
                                           tol: float, one_torch_thread) -> None:
    torch.manual_seed(0)
    baseline = build_model(name, shape, 10).eval()
    assert batchable(baseline) == ""
    data = _random_data(shape)
    geometry = ArrayGeometry(16, 16)
    fmaps = [uniform_fault_map(geometry, r, 10 + i, f"c{i}") for i, r in
             enumerate([0.0, 0.2, 0.4])]
    run = BatchedFat.from_baseline(baseline, fmaps, LAYERS, data, FAT)
    amount = steps / run.n_per_epoch
    run.advance(amount)
    measured = run.measure(["val"])
    for k, fmap in enumerate(fmaps):
        alone = FatSession.from_baseline(baseline, fmap, LAYERS, data, FAT)
        alone.advance(amount)
        mine = run.model(k)
        assert _max_diff(alone.model, mine) < tol
        for key, keep in alone.masks.items():        # its faulty PEs' weights exactly zero
            assert (dict(mine.named_parameters())[key][~keep] == 0).all()
        got = measured[k]["val"]
        want = alone.measure(["val"])["val"]
        assert abs(got.accuracy - want.accuracy) <= 2 / len(data.y["val"])
        # handed on, it trains on as a FatSession: the same batches and optimizer state
        handed = run.session(k)
        assert handed.steps == alone.steps
        handed.advance(2 * amount)
        alone.advance(2 * amount)
        assert _max_diff(alone.model, handed.model) < 10 * tol


def test_the_loss_of_one_chip_moves_only_its_own_weights(one_torch_thread) -> None:
    """A chip whose every PE is faulty keeps all-zero weights while the others train."""
    torch.manual_seed(0)
    baseline = build_model("lenet", (1, 8, 8), 10).eval()
    data = _random_data((1, 8, 8))
    geometry = ArrayGeometry(16, 16)
    fmaps = [uniform_fault_map(geometry, 1.0, 1, "dead"), uniform_fault_map(geometry, 0.0, 2)]
    run = BatchedFat.from_baseline(baseline, fmaps, LAYERS, data, FAT)
    run.advance(1.0)
    dead, live = run.model(0), run.model(1)
    for key in run.masks[0]:
        assert (dict(dead.named_parameters())[key] == 0).all()
        assert not torch.equal(dict(live.named_parameters())[key],
                               dict(baseline.named_parameters())[key])


class _Reshaping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.size(0), -1))


def test_what_the_batched_computation_does_not_know_trains_one_by_one() -> None:
    sample = torch.randn(4, 1, 8, 8)
    assert "call_method" in batchable(_Reshaping())
    assert "dropout" in batchable(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)))
    lenet = build_model("lenet", (1, 8, 8), 10)
    assert stackable(lenet, sample) == ""
    assert batch_size(8, lenet, False, sample) == 8
    assert batch_size(8, lenet, True, sample) == 1            # stuck-at bits: one by one
    assert batch_size(8, _Reshaping(), False, sample) == 1
    assert batch_size(1, lenet, False, sample) == 1
    # on a CPU a model of more work per image than stacking pays for trains one by one
    vgg, rgb = build_model("vgg11", (3, 8, 8), 10), torch.randn(4, 3, 8, 8)
    assert forward_flops(lenet, sample) == 2 * (6 * 25 * 64 + 16 * 150 * 16 + 64 * 120
                                                + 120 * 84 + 84 * 10)
    assert forward_flops(vgg, rgb) > CPU_MAX_MFLOP * 1e6 > forward_flops(lenet, sample)
    assert stackable(vgg, rgb) == ""
    assert batch_size(8, vgg, False, rgb) == 1
    assert batch_size(8, vgg, False, rgb, device="cuda") == 8    # decided, nothing run there
    # a linear layer on 3-d activations: refused by a trial forward pass, not mid-training
    three_d = nn.Sequential(nn.Linear(8, 8))
    assert stackable(three_d, torch.randn(4, 1, 8, 8)) != ""


def test_chunks_keep_one_seed_together_and_split_evenly() -> None:
    keys = [0] * 11 + [1] * 3
    got = chunks(keys, 8)
    assert [len(c) for c in got] == [6, 5, 3]
    assert sorted(i for c in got for i in c) == list(range(14))
    assert all(len({keys[i] for i in c}) == 1 for c in got)
    assert chunks([0] * 5, 1) == [[0], [1], [2], [3], [4]]


def test_chunks_come_in_a_multiple_of_the_workers_where_the_units_allow() -> None:
    got = chunks([0] * 100, 8, workers=2)
    assert len(got) == 14 and {len(c) for c in got} == {7, 8}
    assert [i for c in got for i in c] == list(range(100))
    assert len(chunks([0] * 100, 8)) == 13                       # one worker: as few as fit
    got = chunks([0] * 11 + [1] * 3, 8, workers=4)               # the largest chunks split
    assert [len(c) for c in got] == [4, 3, 4, 3]
    assert all(len({([0] * 11 + [1] * 3)[i] for i in c}) == 1 for c in got)
    assert chunks([0] * 3, 8, workers=4) == [[0], [1], [2]]      # fewer units than workers


GRID = ["resilience.fault_rates=[0.1, 0.2, 0.3]", "resilience.repetitions=2",
        "resilience.max_epochs=0.5", "resilience.checkpoint_every=0.25"]


def test_resilience_batched_gives_the_trials_of_one_by_one(prepared_digits,
                                                           one_torch_thread) -> None:
    """Past the grid too: a level no trial reaches sends each on alone, to the cap."""
    one = ExecutionConfig("local", None, 1, 1, 1)
    target = resilience.TrialTarget(1.0, 1.0, 0.0)
    alone = grid_trials(prepared_digits, one, GRID, target)
    batched = grid_trials(prepared_digits, dataclasses.replace(one, batch=8), GRID, target)
    pooled = grid_trials(prepared_digits, ExecutionConfig("local", None, 2, 0, 8), GRID, target)
    assert all(r.amounts[-1] == 1.0 and r.extended for r in batched)
    a, b = trials_record.table(alone), trials_record.table(batched)
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 6 * 5
    n_val = len(prepared_digits.y["val"])
    for col in ("val_accuracy", "test_accuracy"):     # within an image or two of each other
        assert (a[col] - b[col]).abs().max() <= 2 / n_val + 1e-12 or a[col].isna().all()
    assert (a["amount"] == b["amount"]).all()
    # the pool trains the same chunks: equal to the bit
    pd.testing.assert_frame_equal(b, trials_record.table(pooled))


def test_fat_and_compare_batched_give_the_chips_of_one_by_one(
        tmp_path, tiny_pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fat` (chips and eFAT groups, verified) and `compare` (every chip's curve) batched: the
    same verdicts, epochs and checks as one by one, accuracies within an image or two."""
    base = tiny_pipeline("wafer", WAFER_FLEET, THROUGH_GROUP)
    one = ["execution.workers=1", "execution.torch_threads=1"]
    out = {name: fat_and_compare(base, tmp_path / name, [*one, f"execution.batch={b}"],
                                 monkeypatch) for name, b in (("alone", 1), ("batched", 8))}
    chips = {name: trained_chips(root) for name, root in out.items()}
    a, b = chips["alone"], chips["batched"]
    assert a["trained"].sum() >= 4 and (a["group_size"] > 1).any()
    same = ["chip_id", "status", "actual_epochs", "n_checks", "group_id", "trained"]
    pd.testing.assert_frame_equal(a[same], b[same])
    n_val = len(load_prepared(out["alone"] / "data/prepared").y["val"])
    for col in ("val_accuracy", "test_accuracy"):
        assert (a[col] - b[col]).abs().max() <= 2 / n_val + 1e-9
    curves = {name: pd.read_csv(root / "results/compare/curves.csv") for name, root in
              out.items()}
    ca, cb = curves["alone"], curves["batched"]
    assert ca.shape == cb.shape and (ca["amount"] == cb["amount"]).all()
    assert (ca["val_accuracy"] - cb["val_accuracy"]).abs().max() <= 2 / n_val + 1e-9


def test_trials_batched_in_this_process_report_from_inside(prepared_digits,
                                                          one_torch_thread) -> None:
    """One local worker: a batch of trials says where it is (its amount, how many trials, the
    range of their validation accuracy), then one line per trial."""
    import io

    from reduce_ops.progress import Progress

    cfg = from_dict(tiny_params(GRID))
    torch.manual_seed(0)
    baseline = build_model("lenet", prepared_digits.x["train"].shape[1:], 10)
    specs = resilience.trial_grid(cfg.resilience)
    out = io.StringIO()
    with Progress(len(specs), "resilience", "trial", stream=out, heartbeat=0.0) as progress:
        resilience.run_trials(baseline, prepared_digits, specs, cfg.resilience, cfg.fat,
                              cfg.hardware, resilience.TrialTarget(0.0, 1.0, 0.0), "cpu", {},
                              progress=progress, exe=ExecutionConfig("local", None, 1, 1, 8))
    lines = out.getvalue().splitlines()
    assert any("0.25/0.5 epochs, 3 trials at once, val " in line for line in lines)
    assert sum(f"/{len(specs)} trial " in line for line in lines) == len(specs)


@pytest.mark.parametrize(("groups", "per_group", "out_per_group", "kernel", "width"),
                         [(8, 6, 16, 5, 14), (3, 6, 16, 5, 4), (2, 3, 8, 3, 10), (4, 16, 4, 3, 6)])
def test_the_two_column_input_gradient_is_the_convolutions_own(
        groups: int, per_group: int, out_per_group: int, kernel: int, width: int) -> None:
    """The grouped convolution whose input gradient is computed two columns at a time gives
    the output and every gradient of F.conv2d's, within float rounding (on any CPU: called
    directly, whether or not it pays here)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, groups * per_group, 7, width, generator=g).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(groups * out_per_group, per_group, kernel, kernel, generator=g)
    b = torch.randn(groups * out_per_group, generator=g)
    upstream = torch.randn(5, groups * out_per_group, 7, width, generator=g)
    pad = (kernel - 1) // 2
    grads = []
    for wide in (False, True):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        out = (WideInputGrad.apply(xi, wi, bi, (pad, pad), groups) if wide
               else F.conv2d(xi, wi, bi, 1, pad, 1, groups))
        (out * upstream).sum().backward()
        grads.append((out.detach(), xi.grad, wi.grad, bi.grad))
    for plain, wide in zip(*grads):
        assert plain.shape == wide.shape
        assert torch.allclose(plain, wide, rtol=1e-5, atol=1e-4)


def test_the_two_column_input_gradient_is_used_only_where_it_applies() -> None:
    x = torch.randn(2, 48, 14, 14, requires_grad=True)
    w = torch.randn(128, 6, 5, 5)
    same = nn.Conv2d(6, 16, 5, padding=2)
    assert WideInputGrad.pays(x, w, same, 8) == (vector_width() == 16)   # 6 a group: AVX-512
    assert not WideInputGrad.pays(x, w, same, 1)                          # not grouped
    assert not WideInputGrad.pays(x.detach(), w, same, 8)                 # no input gradient
    assert not WideInputGrad.pays(torch.randn(2, 48, 14, 13, requires_grad=True), w, same, 8)
    assert not WideInputGrad.pays(x, w, nn.Conv2d(6, 16, 5, padding=2, stride=2), 8)
    assert not WideInputGrad.pays(x, w, nn.Conv2d(6, 16, 5, padding=1), 8)
    with torch.no_grad():
        assert not WideInputGrad.pays(x, w, same, 8)
    wide16 = torch.randn(128, 16, 5, 5)                                    # a full vector
    assert not WideInputGrad.pays(torch.randn(2, 128, 14, 14, requires_grad=True), wide16,
                                   nn.Conv2d(16, 16, 5, padding=2), 8)

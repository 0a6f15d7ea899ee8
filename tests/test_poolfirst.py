"""reduce_ops.poolfirst: an activation that only a max-pool reads runs after the pool, and the
model trains and answers the same to the bit."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from reduce_ops import baseline
from reduce_ops.baseline import pretrain
from reduce_ops.models import ThresholdReLU, build_model
from reduce_ops.poolfirst import pool_first
from reduce_ops.quant import quantized_accuracy
from reduce_ops.sharpness import flatness
from reduce_ops.training import evaluate_images

SPLITS = ("train", "val", "test")


def _kinds(model: nn.Module) -> list[str]:
    """The module kinds a traced model calls, in order."""
    return [type(model.get_submodule(n.target)).__name__ for n in model.graph.nodes
            if n.op == "call_module"]


@pytest.mark.parametrize("name, threshold, sharpness", [
    ("lenet", 0.0, "none"), ("lenet", 0.1, "sam"), ("lenet-bn", 0.0, "saq")])
def test_pretraining_through_it_is_the_same_to_the_bit(prepared_digits, tiny_cfg, monkeypatch,
                                                       name, threshold, sharpness) -> None:
    cfg = dataclasses.replace(tiny_cfg.train, max_epochs=2, sharpness=sharpness, rho=0.05)
    runs = []
    for moved in (True, False):
        if not moved:
            monkeypatch.setattr(baseline, "pool_first", lambda m: m)
        torch.manual_seed(0)
        model = build_model(name, prepared_digits.input_shape, 10, threshold)
        result = pretrain(model, prepared_digits, cfg)
        runs.append((model, [(r.train_loss, r.holdout_accuracy, r.holdout_loss)
                             for r in result.history]))
    (a, history_a), (b, history_b) = runs
    assert history_a == history_b
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lenet_runs_each_activation_after_its_pool_on_the_models_own_weights(
        prepared_digits, monkeypatch) -> None:
    import reduce_ops.quant as quant
    import reduce_ops.sharpness as sharpness

    torch.manual_seed(0)
    model = build_model("lenet", prepared_digits.input_shape, 10, 0.1)
    fast = pool_first(model)
    assert _kinds(fast)[:6] == ["Conv2d", "MaxPool2d", "ThresholdReLU"] * 2
    assert {id(p) for p in fast.parameters()} == {id(p) for p in model.parameters()}
    x, y = prepared_digits.x["val"], prepared_digits.y["val"]
    correct, loss = evaluate_images(model, x, y)
    correct_fast, loss_fast = evaluate_images(fast, x, y)
    assert torch.equal(correct, correct_fast) and loss == loss_fast
    model.eval()
    with torch.no_grad():
        assert torch.equal(fast(x[:64]), model(x[:64]))
    # int8 accuracy and flatness (which perturbs the model's weights) through it, and not
    measured = [quantized_accuracy(model, x, y, ["conv", "linear"]),
                flatness(model, x, y, 0.2, 3, 11)]
    monkeypatch.setattr(quant, "pool_first", lambda m: m)
    monkeypatch.setattr(sharpness, "pool_first", lambda m: m)
    assert measured == [quantized_accuracy(model, x, y, ["conv", "linear"]),
                        flatness(model, x, y, 0.2, 3, 11)]


class _Net(nn.Module):
    """conv -> activation -> max-pool (3x3, stride 2, padding 1: overlapping windows, as in
    ResNet-18) -> linear."""

    def __init__(self, act: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.conv, self.act, self.pool = nn.Conv2d(1, 4, 3, padding=1), act, pool
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


@pytest.mark.parametrize("act", [nn.ReLU(), ThresholdReLU(0.0), ThresholdReLU(0.3)])
def test_overlapping_windows_train_the_same_to_the_bit(act) -> None:
    torch.manual_seed(0)
    a = _Net(act, nn.MaxPool2d(3, 2, 1))
    b = copy.deepcopy(a)
    fast = pool_first(b)
    assert _kinds(fast) == ["Conv2d", "MaxPool2d", type(act).__name__, "Linear"]
    gen = torch.Generator().manual_seed(1)
    # rounded inputs make ties inside windows, where the gradient's route matters
    x = (torch.randn(16, 1, 8, 8, generator=gen) * 2).round()
    y = torch.randint(0, 3, (16,), generator=gen)
    for model, forward in ((a, a), (b, fast)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(20):
            opt.zero_grad()
            nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class _ReadsTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv(x)))
        return x * 2 if self.training else x


class _TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        return self.pool(a).sum() + a.sum()


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act, self.pool = nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(x)) if x.sum() > 0 else x


@pytest.mark.parametrize("model", [
    _Net(ThresholdReLU(-0.5), nn.MaxPool2d(3, 2, 1)),   # not monotone through 0: not moved
    _Net(nn.ReLU(), nn.AvgPool2d(3, 2, 1)),              # an average does not commute with it
    _ReadsTraining(),                                    # the traced code would fix one mode
    _TwoReaders(),                                       # the activation is read elsewhere too
    _DataDependent(),                                    # torch.fx cannot trace it
], ids=["negative-threshold", "avg-pool", "reads-training", "two-readers", "untraceable"])
def test_a_model_it_cannot_reorder_exactly_is_returned_as_it_is(model) -> None:
    assert pool_first(model) is model


@pytest.mark.parametrize("name, stuck", [("lenet", False), ("vgg11", False), ("lenet", True)])
def test_a_chip_one_by_one_trains_and_measures_the_same_to_the_bit(monkeypatch, name,
                                                                    stuck) -> None:
    import reduce_ops.fault_aware as fault_aware
    from reduce_ops.config import FatConfig
    from reduce_ops.fault_aware import FatSession
    from reduce_ops.hardware import ArrayGeometry, uniform_fault_map
    from reduce_ops.hardware.bitfaults import random_pe_stuck_map

    shape = (1, 8, 8) if name == "lenet" else (3, 8, 8)
    g = torch.Generator().manual_seed(1)
    data = SimpleNamespace(x={s: torch.randn(96, *shape, generator=g) for s in SPLITS},
                           y={s: torch.randint(0, 10, (96,), generator=g) for s in SPLITS})
    torch.manual_seed(0)
    baseline = build_model(name, shape, 10).eval()
    geometry = ArrayGeometry(16, 16)
    fmap = uniform_fault_map(geometry, 0.2, 3, "c0")
    chip = random_pe_stuck_map(geometry, 0.2, torch.Generator().manual_seed(2),
                                chip_id="c0") \
        if stuck else None
    cfg = FatConfig("sgd", 0.01, 0.9, 0.0005, 32, 0)
    runs = []
    for moved in (True, False):
        if not moved:
            monkeypatch.setattr(fault_aware, "pool_first", lambda m: m)
        session = FatSession.from_baseline(baseline, fmap, ["conv", "linear"], data, cfg,
                                           stuck=chip)
        assert (session._forward is not session.model) == moved
        session.advance(1.0)
        runs.append((session.measure(["val", "test"]), session.release().state_dict()))
    (measured_a, a), (measured_b, b) = runs
    assert measured_a == measured_b
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

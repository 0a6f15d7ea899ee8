"""Model zoo: every model builds for each input shape and round-trips through a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reduce_ops.errors import ConfigError, DataError
from reduce_ops.models import (
    MODEL_NAMES,
    ThresholdReLU,
    build_model,
    load_checkpoint,
    save_checkpoint,
)

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_pass_on_input_shape(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_vgg11_keeps_torchvision_structure_for_cifar() -> None:
    model = build_model("vgg11", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    assert len(convs) == 8 and len(pools) == 5          # VGG11: 8 convs, 5 pools at 32x32
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]


def test_unknown_model() -> None:
    with pytest.raises(ConfigError, match="model.name: unknown model 'vgg16'"):
        build_model("vgg16", (1, 8, 8), 10)


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("lenet", (1, 8, 8), 10).eval()
    arch = {"name": "lenet", "input_shape": [1, 8, 8], "num_classes": 10}
    path = tmp_path / "models" / "baseline.pt"
    save_checkpoint(model, arch, {"test_accuracy": 0.5}, path)
    raw = torch.load(path, weights_only=True)             # no pickle of code objects needed
    assert raw["arch"] == arch and raw["info"]["test_accuracy"] == 0.5
    loaded, _ = load_checkpoint(path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a reduce-ops model checkpoint"):
        load_checkpoint(path)
    with pytest.raises(DataError, match="run `reduce-ops pretrain` first"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("threshold", [0.1, 0.5])
def test_threshold_relu_is_x_above_the_threshold_else_zero_with_its_gradient(
        threshold: float) -> None:
    """The fused kernel gives what its definition says, values and gradients alike, at and
    around the threshold, for signed zeros and infinities, in both memory layouts."""
    torch.manual_seed(0)
    edges = torch.tensor([threshold, threshold + 1e-7, threshold - 1e-7, 0.0, -0.0, 1.0,
                          -1.0, float("inf"), -float("inf")])
    x = torch.cat([torch.randn(4 * 6 * 5 * 5 - edges.numel()), edges]).reshape(4, 6, 5, 5)
    for layout in (torch.contiguous_format, torch.channels_last):
        a = x.contiguous(memory_format=layout).detach().requires_grad_()
        b = x.clone().detach().requires_grad_()
        out = ThresholdReLU(threshold)(a)
        expected = torch.where(b > threshold, b, torch.zeros(()))
        assert torch.equal(out, expected)
        assert torch.equal(torch.signbit(out), torch.signbit(expected))
        weight = torch.randn(x.shape)
        (out * weight).sum().backward()
        (expected * weight).sum().backward()
        assert torch.equal(a.grad, b.grad)


def test_lenet_bn_is_lenet_with_a_batch_norm_after_each_convolution() -> None:
    """lenet-bn adds a BatchNorm after each convolution; lenet keeps its layers' names, so
    lenet's checkpoints load as before."""
    plain, bn = (build_model(n, (1, 28, 28), 10) for n in ("lenet", "lenet-bn"))
    assert list(plain.state_dict()) == [f"{part}.{i}.{p}" for part, i in (
        ("features", 0), ("features", 3), ("classifier", 1), ("classifier", 3),
        ("classifier", 5)) for p in ("weight", "bias")]
    kinds = [type(m).__name__ for m in bn.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2
    assert [m.num_features for m in bn.features if isinstance(m, torch.nn.BatchNorm2d)] == [6, 16]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())

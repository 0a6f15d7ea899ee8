"""Model zoo: build_model(name, input_shape, num_classes); the checkpoint format (state_dict +
the arch that rebuilds the module: a zoo model, a user's factory or MLflow model); the model as
it is served (raw images in, normalised inside)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from reduce_ops.atomic import write_file
from reduce_ops.errors import ConfigError, DataError

MODEL_NAMES = ("lenet", "lenet-bn", "mlp", "vgg11", "resnet18")


class ThresholdReLU(nn.Module):
    """ReLU with a forced activation threshold (FATReLU): x where x > threshold, else 0.
    Threshold 0 is the ReLU; a higher one makes activations sparse. One fused kernel
    (`F.threshold`, forward and backward): a LeNet first-layer activation of 256 images here
    0.34 ms against 4.8 ms for `torch.where`, the same values and gradients; a NaN passes
    through, as it does in nn.ReLU."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.threshold(x, self.threshold, 0.0)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:g}"


ACTIVATIONS = (nn.ReLU, ThresholdReLU)


def _threshold_activations(module: nn.Module, threshold: float) -> None:
    """Replace every ReLU in `module` (recursively) by a ThresholdReLU(threshold)."""
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, ThresholdReLU(threshold))
        else:
            _threshold_activations(child, threshold)


@torch.no_grad()
def activation_sparsity(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of activations (outputs of every ReLU / ThresholdReLU) that are exactly zero on
    inputs `x`, measured in eval mode."""
    zeros, total = [0], [0]

    def count(_module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        zeros[0] += int((out == 0).sum())
        total[0] += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, ACTIVATIONS)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return zeros[0] / total[0] if total[0] else 0.0


class LeNet(nn.Module):
    """LeNet-5 (6 and 16 channels, 120-84 classifier) with 'same' convs, for any input >= 4x4;
    `batch_norm`: a BatchNorm after each convolution (zoo name lenet-bn), the smallest network
    whose BatchNorm statistics a pruned fault map upsets, as ResNet-18's are."""

    def __init__(self, in_channels: int, num_classes: int, spatial: int,
                 batch_norm: bool = False) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 5, padding=2),
                    *([nn.BatchNorm2d(c_out)] if batch_norm else [])]

        self.features = nn.Sequential(
            *conv(in_channels, 6), nn.ReLU(), nn.MaxPool2d(2),   # -> s/2
            *conv(6, 16), nn.ReLU(), nn.MaxPool2d(2),            # -> s/4
        )
        flat = 16 * (spatial // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    n_in = int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 256), nn.ReLU(),
                         nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes))


def _vgg11(in_channels: int, num_classes: int, spatial: int) -> nn.Module:
    """torchvision VGG11 for small inputs: only as many max-pools as the input allows, then
    global pooling and one Linear (the usual CIFAR adaptation: 32x32 -> 1x1 after 5 pools)."""
    from torchvision.models import vgg11

    model = vgg11(weights=None, num_classes=num_classes)
    layers: list[nn.Module] = []
    size = spatial
    for layer in model.features:
        if isinstance(layer, nn.Conv2d) and not layers:
            layer = nn.Conv2d(in_channels, layer.out_channels, 3, padding=1)
        if isinstance(layer, nn.MaxPool2d):
            if size < 2:
                continue           # an 8x8 input keeps 3 of the 5 pools
            size //= 2
        layers.append(layer)
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(512, num_classes)
    return model


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ResNet18 for small inputs: 3x3 stride-1 stem and no stem max-pool."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, input_shape: tuple[int, ...] | list[int], num_classes: int,
                activation_threshold: float = 0.0) -> nn.Module:
    """A freshly initialised model for inputs of shape (C, H, W) and `num_classes` outputs;
    with `activation_threshold` > 0 its ReLUs are thresholded (activation-sparse)."""
    c, h, w = (int(v) for v in input_shape)
    if name in ("lenet", "lenet-bn"):
        model = LeNet(c, num_classes, min(h, w), batch_norm=name == "lenet-bn")
    elif name == "mlp":
        model = _mlp((c, h, w), num_classes)
    elif name == "vgg11":
        model = _vgg11(c, num_classes, min(h, w))
    elif name == "resnet18":
        model = _resnet18(c, num_classes)
    else:
        raise ConfigError(f"model.name: unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    if activation_threshold < 0:
        raise ConfigError(f"model.activation_threshold: must be >= 0, got {activation_threshold}")
    if activation_threshold > 0:
        _threshold_activations(model, activation_threshold)
    return model


def architecture(arch: dict[str, Any], tracking_uri: str | None = None) -> nn.Module:
    """The untrained module a checkpoint's `arch` describes: a zoo model (build_model's
    arguments), a user's factory (source python) or MLflow model (source mlflow, fetched from
    its tracking store, or `tracking_uri` when given), with its off-array layers marked."""
    from reduce_ops.hardware.mapping import leave_off_array

    source = arch.get("source", "zoo")
    if source == "zoo":
        model = build_model(arch["name"], arch["input_shape"], arch["num_classes"],
                            arch.get("activation_threshold", 0.0))
    else:
        from reduce_ops import model_source

        model = model_source.skeleton(arch, tracking_uri)
    leave_off_array(model, arch.get("exclude_layers", []))
    return model


def save_checkpoint(model: nn.Module, arch: dict[str, Any], info: dict[str, Any],
                    path: Path) -> None:
    """Write {state_dict, arch, info} atomically; loadable with torch.load(weights_only=True)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_file(path, lambda tmp: torch.save({"state_dict": state, "arch": arch, "info": info},
                                            tmp))


def load_checkpoint(path: Path, device: str | torch.device = "cpu",
                    exclude_layers: list[str] | None = None,
                    tracking_uri: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model stored by save_checkpoint; returns (model in eval mode, checkpoint).
    `exclude_layers` (hardware.exclude_layers now) must be what the file was saved with."""
    if not path.is_file():
        raise DataError(f"{path}: no baseline model; run `reduce-ops pretrain` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        arch = ckpt["arch"]
    except (RuntimeError, KeyError, OSError, ValueError, TypeError,
            pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: not a reduce-ops model checkpoint ({_first(exc)})") from None
    saved = list(arch.get("exclude_layers", []))
    if exclude_layers is not None and list(exclude_layers) != saved:
        raise DataError(f"{path} was saved with hardware.exclude_layers {saved}, params say "
                        f"{list(exclude_layers)}; run `reduce-ops pretrain` again")
    model = architecture(arch, tracking_uri)     # a user's code or model: its own one line
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a reduce-ops model checkpoint ({_first(exc)})") from None
    return model.to(device).eval(), ckpt


def _first(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# --------------------------------------------------------------------------- serving

def serving_requirements() -> list[str]:
    """What a served (pt2) model needs to load; explicit, so MLflow skips its slow inference."""
    import numpy as np

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


class RawInput(nn.Module):
    """`net` behind its preprocessing: takes the images a user has, uint8 [N, C, H, W] pixel
    values 0-255 as in the dataset, and scales them to [0, 1] and normalises each channel
    inside (the same float operations as data.load_prepared, so the logits are the same)."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).div(255.0)                        # [N, C, H, W] in [0, 1]
        return self.net((x - self.mean) / self.std)


@dataclass(frozen=True)
class Preprocess:
    """The dataset's preprocessing, which every served model carries inside."""

    mean: list[float]
    std: list[float]
    classes: list[str]
    input_shape: list[int]

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Preprocess:
        return cls(list(meta["mean"]), list(meta["std"]), [str(c) for c in meta["classes"]],
                   list(meta["input_shape"]))

    def wrap(self, model: nn.Module) -> RawInput:
        """`model` (which reads normalised images) as served, in eval mode: what ships is what
        verification measured (BatchNorm on its running statistics)."""
        return RawInput(model, self.mean, self.std).eval()

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images back to the uint8 pixels they came from (exact: the float error
        is far below half a grey level)."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x * std + mean).mul(255.0).round().clamp(0, 255).to(torch.uint8)

    def describe(self) -> str:
        """The served model's contract, for its description."""
        c, h, w = self.input_shape
        classes = ", ".join(self.classes[:20]) + (", ..." if len(self.classes) > 20 else "")
        return (f"Input: raw images as uint8 [N, {c}, {h}, {w}] (pixel values 0-255, channels "
                f"first); the model divides by 255 and normalises each channel with mean "
                f"{[round(v, 6) for v in self.mean]} and std {[round(v, 6) for v in self.std]} "
                f"inside, so a client sends the pixels as they are. Output: logits [N, "
                f"{len(self.classes)}] for the classes {classes} (argmax = the class).")

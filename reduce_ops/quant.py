"""Int8 weights as the accelerator stores them: symmetric per-output-channel quantization, fake
quantization with a straight-through estimator (STE), and a model's mapped weights run quantized,
optionally read through a fault model (bit flips, stuck-at cells) that acts on the int8 values.

The float weights stay the master copy: every forward pass quantizes them, applies the fault to
the int8 values and dequantizes, and the backward pass hands the gradient to the float weights
unchanged (STE), so fault-aware training trains *through* the faults the chip has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from reduce_ops.errors import ConfigError, FaultMapError
from reduce_ops.hardware.mapping import _weight_param_name, mapped_layers
from reduce_ops.poolfirst import pool_first
from reduce_ops.training import evaluate

QMAX = 127  # symmetric int8: -127..127 (-128 is never written, but a fault can read it)


@dataclass(frozen=True)
class QuantizedTensor:
    """Int8 values and the per-output-channel scale beside them: W ~ q * scale[m]."""

    q: torch.Tensor      # int8, the weight's shape
    scale: torch.Tensor  # float [M], M = shape[0] (output channels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self, q: torch.Tensor | None = None) -> torch.Tensor:
        """q * scale as floats; `q` (e.g. faulty values read back) replaces the stored ones."""
        return dequantize(self.q if q is None else q, self.scale)


class WeightFault(Protocol):
    """A fault on one weight's stored int8 values (hardware.bitfaults.BitFlips, StuckBits)."""

    shape: tuple[int, ...]

    def apply(self, q: torch.Tensor) -> torch.Tensor:
        """The int8 values read back from stored int8 values `q` (a new tensor)."""
        ...

    def apply_(self, q: torch.Tensor) -> torch.Tensor:
        """The same, overwriting `q` (contiguous int8); returns it."""
        ...


def _channel_view(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """[M] -> [M, 1, ...] broadcasting over a weight of `dim` dimensions."""
    return scale.view(-1, *([1] * (dim - 1)))


def channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """scale[m] = max|W[m, ...]| / 127 (float [M]); an all-zero channel gets scale 1 (q = 0)."""
    if weight.dim() < 1 or weight.shape[0] == 0 or not weight.is_floating_point():
        raise ConfigError(f"quantization needs a float weight with output channels in dim 0, "
                          f"got {weight.dtype} of shape {tuple(weight.shape)}")
    low, high = weight.detach().reshape(weight.shape[0], -1).aminmax(dim=1)  # [M] each
    amax = torch.maximum(-low, high)  # max |W[m, ...]| without an |W| copy
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def quantize(weight: torch.Tensor) -> QuantizedTensor:
    """Symmetric per-output-channel int8: q = clamp(round(W / scale), -127, 127)."""
    scale = channel_scale(weight)
    scaled = weight.detach() / _channel_view(scale, weight.dim())
    # contiguous: faults address bytes by flat index (channels_last weights included)
    q = scaled.round_().clamp_(-QMAX, QMAX).to(torch.int8, memory_format=torch.contiguous_format)
    return QuantizedTensor(q, scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weights q * scale[m], in scale's dtype."""
    return q.to(scale.dtype) * _channel_view(scale, q.dim())


class _StraightThrough(torch.autograd.Function):
    """Forward: dequantize(fault(quantize(W))). Backward: dL/dW = dL/dW_read (identity).

    The scale comes from W itself, so no weight is ever clamped and the identity is the exact
    STE; a stuck or flipped bit moves the value read, not the gradient the master gets.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, fault: WeightFault | None) -> torch.Tensor:
        stored = quantize(weight)
        if fault is not None:
            fault.apply_(stored.q)  # a fresh tensor of ours: no copy
        return stored.dequantize()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize(weight: torch.Tensor, fault: WeightFault | None = None) -> torch.Tensor:
    """The weight as the accelerator reads it (int8, through `fault`), as floats; the gradient
    passes straight through to `weight`."""
    return _StraightThrough.apply(weight, fault)


class Int8Weight(nn.Module):
    """Parametrization of a mapped weight: what the forward pass sees is fake_quantize(W, fault)
    (+ `perturbation`, a float tensor added after the quantizer: SAQ's ascent).

    `fault` is swapped freely (a trial's fresh bit flips, a chip's stuck bits); neither holds
    parameters or buffers, so state_dicts and optimizers see only the float master weight.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fault: WeightFault | None = None
        self.perturbation: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        read = fake_quantize(weight, self.fault)
        return read if self.perturbation is None else read + self.perturbation


class QuantizedWeights:
    """Run a model's mapped weights (conv + linear, as hardware.mapping maps them) as int8,
    optionally faulty; biases stay float and are never quantized or faulted.

    install() registers an Int8Weight parametrization on each mapped weight; remove() takes it
    off and the model is the float model again, bit for bit (the same Parameter objects, so an
    optimizer built before or during keeps working). Use as a context manager. While installed,
    a master weight is named "<layer>.parametrizations.weight.original" in named_parameters()
    and state_dict(); master_weights() gives them under their usual names. Build MaskedWeights /
    FatSession (which look weights up by name) before installing.

    Training: every forward pass re-quantizes the current master weights and reads them through
    the faults, so stuck bits stay forced while the masters learn (STE). Evaluating a trial:
    set_faults(draw_model_bit_flips(shapes(), ber, generator)), then run all batches inside
    torch.nn.utils.parametrize.cached() so each weight is quantized and faulted once per trial.
    """

    def __init__(self, model: nn.Module, layer_types: Iterable[str] = ("conv", "linear"),
                 faults: Mapping[str, WeightFault] | None = None) -> None:
        self.model = model
        # "features.0.weight" -> module
        self.layers = {_weight_param_name(name): module
                       for name, module in mapped_layers(model, layer_types).items()}
        self._faults = dict(faults) if faults else {}
        self._check_faults(self._faults, "faults")
        self.installed = False

    # ---------------------------------------------------------------- install / remove
    def install(self) -> QuantizedWeights:
        """Parametrize every mapped weight; the forward pass then sees int8 weights."""
        if self.installed:
            raise ConfigError("quantized weights are already installed on this model")
        for name, module in self.layers.items():
            if parametrize.is_parametrized(module, "weight"):
                raise ConfigError(f"{name}: already parametrized; cannot quantize it as well")
        for name, module in self.layers.items():
            parametrize.register_parametrization(module, "weight", Int8Weight())
        self.installed = True
        self._push_faults()
        return self

    def remove(self) -> None:
        """Back to the float model: the master weights, untouched by quantization or faults."""
        if not self.installed:
            return
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        self.installed = False

    def __enter__(self) -> QuantizedWeights:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ---------------------------------------------------------------- faults
    def _check_faults(self, faults: Mapping[str, WeightFault], key: str) -> None:
        for name, fault in faults.items():
            if name not in self.layers:
                raise FaultMapError(f"{key}: {name!r} is not a mapped weight of the model "
                                    f"(mapped: {', '.join(self.layers) or 'none'})")
            shape = tuple(self._master(name).shape)
            if tuple(fault.shape) != shape:
                raise FaultMapError(f"{key}: fault for {name!r} has shape {tuple(fault.shape)}, "
                                    f"the weight {shape}")

    def _push_faults(self) -> None:
        if self.installed:
            for name, module in self.layers.items():
                module.parametrizations.weight[0].fault = self._faults.get(name)

    def set_faults(self, faults: Mapping[str, WeightFault] | None, key: str = "faults") -> None:
        """Read each named weight through its fault from the next forward pass on (weights not
        named read clean); None clears all. Faults should live on their weight's device."""
        faults = dict(faults) if faults else {}
        self._check_faults(faults, key)
        self._faults = faults
        self._push_faults()

    def set_perturbations(self, perturbations: Mapping[str, torch.Tensor] | None) -> None:
        """Add each named tensor to its weight after the quantizer (and faults) until cleared
        with None: the read weights become Q(W) + e (SAQ's ascent). Needs install()."""
        perturbations = dict(perturbations) if perturbations else {}
        for name in perturbations:
            if name not in self.layers:
                raise ConfigError(f"perturbation for {name!r}: not a mapped weight")
        if not self.installed:
            if perturbations:
                raise ConfigError("perturbations need the quantized weights installed")
            return
        for name, module in self.layers.items():
            module.parametrizations.weight[0].perturbation = perturbations.get(name)

    @property
    def faults(self) -> dict[str, WeightFault]:
        return dict(self._faults)

    # ---------------------------------------------------------------- views
    def _master(self, name: str) -> nn.Parameter:
        module = self.layers[name]
        if parametrize.is_parametrized(module, "weight"):
            return module.parametrizations.weight.original
        return module.weight

    def master_weights(self) -> dict[str, nn.Parameter]:
        """The float master weights by their usual parameter names."""
        return {name: self._master(name) for name in self.layers}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Mapped weight shapes: what a fault drawing needs."""
        return {name: tuple(self._master(name).shape) for name in self.layers}

    @torch.no_grad()
    def stored(self) -> dict[str, QuantizedTensor]:
        """The clean int8 values and scales of the current master weights."""
        return {name: quantize(weight) for name, weight in self.master_weights().items()}

    @torch.no_grad()
    def read(self) -> dict[str, torch.Tensor]:
        """The int8 values the forward pass reads now (stored values through the faults)."""
        out = {}
        for name, stored in self.stored().items():
            fault = self._faults.get(name)
            out[name] = stored.q if fault is None else fault.apply(stored.q)
        return out


def quantized_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       layer_types: Sequence[str], faults: Mapping | None = None) -> float:
    """Accuracy of `model` run as int8 (its mapped weights), read through `faults`; the model
    itself is left as it was."""
    fast = pool_first(model)
    with QuantizedWeights(model, layer_types, faults), parametrize.cached():
        return evaluate(fast, x, y)[0]

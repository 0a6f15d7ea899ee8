"""Weight-stationary weight -> PE mapping: which weights a fault map zeroes (FAP)."""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from reduce_ops.errors import FaultMapError
from reduce_ops.hardware.faultmap import FaultMap

# Layer kinds that run on the array. ConvTranspose is not a subclass of Conv*d and is not mapped.
LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "linear": (nn.Linear,),
}


def _module_classes(layer_types: Iterable[str]) -> tuple[type[nn.Module], ...]:
    """Module classes for layer kind names; unknown names are a clear error."""
    if isinstance(layer_types, str):  # "conv" would otherwise iterate as "c", "o", ...
        layer_types = (layer_types,)
    classes: list[type[nn.Module]] = []
    for kind in layer_types:
        if kind not in LAYER_TYPES:
            raise FaultMapError(
                f"unknown mapped layer type {kind!r}; choose from {', '.join(LAYER_TYPES)}"
            )
        classes.extend(LAYER_TYPES[kind])
    return tuple(classes)


def mapped_layers(
    model: nn.Module, layer_types: Iterable[str] = ("conv", "linear")
) -> dict[str, nn.Module]:
    """Modules whose weights run on the array, by module name (in model.named_modules order)."""
    classes = _module_classes(layer_types)
    return {name: module for name, module in model.named_modules() if isinstance(module, classes)}


def _weight_param_name(module_name: str) -> str:
    """Parameter name of a mapped module's weight as model.named_parameters() spells it."""
    return f"{module_name}.weight" if module_name else "weight"


def layer_keep_mask(
    weight_shape: Iterable[int], faulty: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask of weight_shape, False where the weight runs on a faulty PE (True = keep).

    The weight is viewed as W[M, K] = weight.reshape(out_channels, -1); W[m, k] runs on PE
    (k mod rows, m mod cols), so the mask is the transposed keep map tiled over [M, K].
    `out` (bool, weight_shape, contiguous, e.g. the previous chip's mask) is overwritten
    instead of allocating: for 100M-weight layers, first-touch page faults on a fresh buffer
    cost more than filling it.
    """
    if faulty.dtype != torch.bool or faulty.dim() != 2:
        raise FaultMapError(
            f"fault map must be a 2-D bool tensor, "
            f"got {faulty.dtype} of shape {tuple(faulty.shape)}"
        )
    return tile_pe_grid((~faulty).T.contiguous(), tuple(int(s) for s in weight_shape), out)


def tile_pe_grid(
    grid_t: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Tile a per-PE grid_t [cols, rows] (grid_t[c, r]: the value of PE (r, c)) over a weight's
    [M, K] view: out[m, k] = grid_t[m mod cols, k mod rows], in grid_t's dtype.

    The keep mask (bool) and the per-PE stuck-bit masks (uint8) are both tiled here.
    Broadcasting copies only, no loop over weights or PEs: one [cols, K] strip, then whole
    rows of it, so the cost is about one write of the result.
    """
    if len(shape) < 2:
        raise FaultMapError(f"a mapped weight needs at least 2 dimensions, got shape {shape}")
    cols, rows = grid_t.shape
    m, k = shape[0], math.prod(shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=grid_t.dtype, device=grid_t.device)
    elif out.shape != shape or out.dtype != grid_t.dtype or not out.is_contiguous():
        dtype = str(grid_t.dtype).removeprefix("torch.")
        raise FaultMapError(f"mask buffer must be a contiguous {dtype} tensor of shape {shape}")
    k_tiles = -(-k // rows)  # ceil(K / rows)
    # [cols, K]: strip[c, k] = grid_t[c, k mod rows]; expand is free, reshape copies cols*K.
    strip = grid_t.unsqueeze(1).expand(cols, k_tiles, rows).reshape(cols, k_tiles * rows)[:, :k]
    tiled = out.view(m, k)  # [M, K]; row m is strip[m mod cols]
    m_tiles, m_rest = divmod(m, cols)
    if m_tiles:
        tiled[: m_tiles * cols].view(m_tiles, cols, k).copy_(strip.expand(m_tiles, cols, k))
    if m_rest:
        tiled[m_tiles * cols :].copy_(strip[:m_rest])
    return out


def _faulty_array(fault_map: FaultMap | np.ndarray | torch.Tensor) -> torch.Tensor:
    """The bool [rows, cols] fault map as a CPU tensor."""
    faulty = fault_map.faulty if isinstance(fault_map, FaultMap) else fault_map
    if isinstance(faulty, torch.Tensor):
        tensor = faulty.detach()
    else:
        tensor = torch.from_numpy(np.array(faulty))  # a copy: FaultMap arrays are read-only
    if tensor.dtype != torch.bool or tensor.dim() != 2 or tensor.numel() == 0:
        raise FaultMapError(
            f"fault map must be a non-empty 2-D bool array, got {tensor.dtype} of shape "
            f"{tuple(tensor.shape)}"
        )
    return tensor


def build_masks(
    model: nn.Module,
    fault_map: FaultMap | np.ndarray | torch.Tensor,
    layer_types: Iterable[str] = ("conv", "linear"),
    device: torch.device | str | None = None,
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-mask per mapped weight, keyed by parameter name ("features.0.weight").

    The array geometry is the fault map's shape. Masks go to `device`, or, when None, to the
    device of the weight they mask. Biases are added outside the array and get no mask.
    `out` (masks of a previous call for the same model) is overwritten in place, which is
    several times faster for large layers in a loop over chips; the returned dict holds them.
    """
    # [cols, rows]: keep_t[c, r] is True when PE (r, c) works; one copy per device
    keep_t_cpu = (~_faulty_array(fault_map)).T.contiguous()
    keep_t_on: dict[torch.device, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, module in mapped_layers(model, layer_types).items():
        weight = module.weight
        target = torch.device(device) if device is not None else weight.device
        if target not in keep_t_on:
            keep_t_on[target] = keep_t_cpu.to(target)
        param_name = _weight_param_name(name)
        buffer = out.get(param_name) if out is not None else None
        masks[param_name] = tile_pe_grid(keep_t_on[target], tuple(weight.shape), buffer)
    return masks


def pruned_fraction(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of mapped weights that the masks zero (0.0 when there are none)."""
    total = sum(mask.numel() for mask in masks.values())
    if total == 0:
        return 0.0
    kept = sum(int(torch.count_nonzero(mask)) for mask in masks.values())
    return (total - kept) / total


class MaskedWeights:
    """The mapped weights of one model and their keep-masks, checked once; FAP in place.

    Masks (bool, True = keep) become float multipliers on the weight's device and dtype, so
    zeroing the faulty weights (and, in fault-aware training, their gradients) is one in-place
    multiply per tensor.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        for name, mask in masks.items():
            if name not in params:
                raise FaultMapError(f"mask for {name!r} matches no parameter of the model")
            param = params[name]
            if mask.shape != param.shape:
                raise FaultMapError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )
            self.pairs.append((param, mask.to(device=param.device, dtype=param.dtype)))

    @torch.no_grad()
    def apply(self) -> None:
        """FAP: every weight on a faulty PE becomes exactly 0."""
        for param, keep in self.pairs:
            param.mul_(keep)

    def zero_grads(self) -> None:
        """Zero the faulty weights' gradients, so momentum, Adam moments and weight decay never
        move them."""
        for param, keep in self.pairs:
            if param.grad is not None:
                param.grad.mul_(keep)


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked weights in place (FAP): weight *= mask for every masked parameter."""
    MaskedWeights(model, masks).apply()

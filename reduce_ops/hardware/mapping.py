"""Weight-stationary weight -> PE mapping: which weights a fault map zeroes (FAP).

A layer's weight is the matrix W[m, k] of its im2col lowering: m = output channel, k = the
flattened (input channel, kernel offset) index over ALL input channels of the layer. A grouped
convolution (groups = G, depthwise when G = in_channels) lowers to one block-diagonal matrix:
output channel m of group g = m // (M / G) reads only the input channels of its group, so its
weights sit at k = g * K_g + k_local (K_g = in_channels / G * prod(kernel)), and the blocks off
the diagonal hold zeros that are never stored or masked. W[m, k] runs on PE (k mod rows,
m mod cols); tiles repeat the same PEs. So a depthwise 3x3 channel c uses the 9 rows from
9c (mod rows) of column c (mod cols): every channel meets other PEs, as a compiler that lowers
the layer to one dense matrix would place it.

Layers named in `hardware.exclude_layers` run elsewhere (leave_off_array); a layer with a weight
that is neither a Conv1d/2d/3d nor a Linear (a ConvTranspose, an Embedding, an RNN, attention's
packed projections) cannot be mapped and runs unmasked (unmapped_layers lists both).
"""

from __future__ import annotations

import difflib
import math
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from reduce_ops.errors import ConfigError, FaultMapError
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


# Set on a module (and kept by deepcopy and pickle) that hardware.exclude_layers leaves off
# the array: mapped_layers skips it, so no mask, stuck bit or int8 quantizer ever touches it.
OFF_ARRAY = "_reduce_ops_off_array"


def mapped_layers(
    model: nn.Module, layer_types: Iterable[str] = ("conv", "linear")
) -> dict[str, nn.Module]:
    """Modules whose weights run on the array, by module name (in model.named_modules order)."""
    classes = _module_classes(layer_types)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, classes) and not getattr(module, OFF_ARRAY, False)}


def leave_off_array(model: nn.Module, names: Iterable[str],
                    key: str = "hardware.exclude_layers") -> list[str]:
    """Mark the modules `names` (a container: every layer inside it) as running off the array;
    returns the names of the weight layers it took off. An unknown name is one line naming
    `key` and the model's layers."""
    modules = dict(model.named_modules())
    off: list[str] = []
    for name in names:
        if name not in modules or name == "":
            layers = [n for n, m in modules.items() if n and _own_weight(m) is not None]
            close = difflib.get_close_matches(name, [n for n in modules if n], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}: no layer {name!r} in the model{hint}; its layers with "
                              f"weights: {', '.join(layers[:30]) or 'none'}")
        found = [(sub, module) for sub, module in modules[name].named_modules(prefix=name)
                 if _own_weight(module) is not None]
        if not found:
            raise ConfigError(f"{key}: {name!r} ({type(modules[name]).__name__}) has no "
                              f"weights to leave off the array")
        for sub, module in found:
            setattr(module, OFF_ARRAY, True)
            off.append(sub)
    return off


def _own_weight(module: nn.Module) -> nn.Parameter | None:
    """A module's own (not its children's) matrix-like parameter: its weight, or any other
    parameter with 2+ dimensions (attention's packed in_proj_weight, an RNN's weight_ih_l0)."""
    params = dict(module.named_parameters(recurse=False))
    if "weight" in params and params["weight"].dim() >= 2:
        return params["weight"]
    return next((p for p in params.values() if p.dim() >= 2), None)


def unmapped_layers(model: nn.Module,
                    layer_types: Iterable[str] = ("conv", "linear")) -> dict[str, str]:
    """Layers with a weight matrix that do not run on the array, by module name, with why:
    left off by hardware.exclude_layers, of a kind hardware.layer_types leaves out, or a kind
    that cannot be mapped. Normalisation layers (per-channel scale and shift) are not listed."""
    classes = _module_classes(layer_types)
    every = tuple(c for kinds in LAYER_TYPES.values() for c in kinds)
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if _own_weight(module) is None:
            continue
        kind = type(module).__name__
        if getattr(module, OFF_ARRAY, False):
            out[name] = f"{kind}, hardware.exclude_layers"
        elif isinstance(module, every) and not isinstance(module, classes):
            out[name] = f"{kind}, not in hardware.layer_types"
        elif not isinstance(module, classes):
            out[name] = f"{kind}, cannot be mapped"
    return out


def array_groups(module: nn.Module) -> int:
    """The groups of a mapped layer's block-diagonal weight matrix (1 for a Linear)."""
    return int(getattr(module, "groups", 1))


def _weight_param_name(module_name: str) -> str:
    """Parameter name of a mapped module's weight as model.named_parameters() spells it."""
    return f"{module_name}.weight" if module_name else "weight"


def layer_keep_mask(
    weight_shape: Iterable[int], faulty: torch.Tensor, out: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Bool mask of weight_shape, False where the weight runs on a faulty PE (True = keep).

    The weight is viewed as W[M, K] = weight.reshape(out_channels, -1); W[m, k] runs on PE
    (k mod rows, m mod cols), so the mask is the transposed keep map tiled over [M, K]. With
    `groups` > 1 (a grouped convolution) group g's rows start at g * K (block-diagonal).
    `out` (bool, weight_shape, contiguous, e.g. the previous chip's mask) is overwritten
    instead of allocating: for 100M-weight layers, first-touch page faults on a fresh buffer
    cost more than filling it.
    """
    if faulty.dtype != torch.bool or faulty.dim() != 2:
        raise FaultMapError(
            f"fault map must be a 2-D bool tensor, "
            f"got {faulty.dtype} of shape {tuple(faulty.shape)}"
        )
    return tile_pe_grid((~faulty).T.contiguous(), tuple(int(s) for s in weight_shape), out,
                        groups)


def tile_pe_grid(
    grid_t: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Tile a per-PE grid_t [cols, rows] (grid_t[c, r]: the value of PE (r, c)) over a weight's
    [M, K] view: out[m, k] = grid_t[m mod cols, (g(m) * K + k) mod rows], in grid_t's dtype,
    where g(m) = m // (M / groups) is the group of output channel m (0 for groups = 1).

    The keep mask (bool) and the per-PE stuck-bit masks (uint8) are both tiled here.
    Broadcasting copies only, no loop over weights or PEs: one [cols, K] strip, then whole
    rows of it, so the cost is about one write of the result.
    """
    if len(shape) < 2:
        raise FaultMapError(f"a mapped weight needs at least 2 dimensions, got shape {shape}")
    cols, rows = grid_t.shape
    m, k = shape[0], math.prod(shape[1:])
    if groups < 1 or m % groups:
        raise FaultMapError(f"a weight of shape {shape} cannot form {groups} groups")
    if out is None:
        out = torch.empty(shape, dtype=grid_t.dtype, device=grid_t.device)
    elif out.shape != shape or out.dtype != grid_t.dtype or not out.is_contiguous():
        dtype = str(grid_t.dtype).removeprefix("torch.")
        raise FaultMapError(f"mask buffer must be a contiguous {dtype} tensor of shape {shape}")
    if groups > 1:
        return _tile_grouped(grid_t, m, k, groups, out)
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


def _tile_grouped(grid_t: torch.Tensor, m: int, k: int, groups: int,
                  out: torch.Tensor) -> torch.Tensor:
    """tile_pe_grid for a block-diagonal weight: group g's K columns of W start at row g * K.
    One gather: [M] column indices against [M, K] row indices (int64, 8 bytes per weight)."""
    cols, rows = grid_t.shape
    dev = grid_t.device
    group = torch.arange(m, device=dev) // (m // groups)                     # [M]
    row = (group.unsqueeze(1) * k + torch.arange(k, device=dev)) % rows      # [M, K]
    col = (torch.arange(m, device=dev) % cols).unsqueeze(1)                  # [M, 1]
    out.view(m, k).copy_(grid_t[col, row])
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
        masks[param_name] = tile_pe_grid(keep_t_on[target], tuple(weight.shape), buffer,
                                         array_groups(module))
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

"""K copies of one model as ONE module: every weight stacked per copy, one forward pass for all.

Copies that read the same batch differ only in their weights, so their forward passes fit in
one: the first convolution reads the shared batch with every copy's filters stacked (K x its
output channels), later convolutions are grouped (one group per copy), linear layers are one
batched matrix product per layer (`baddbmm`), ReLU, pooling and BatchNorm act per channel as
they are. Activations are kept channels-last, the layout the CPU's convolutions are fastest in,
and an activation right before a max-pool runs after it (exact). Each copy's output equals its
own model's within float rounding (a grouped convolution adds its products in another order).

A model can be stacked when torch.fx can trace it, every node is one StackedModel knows (see
`NotBatchable`) and a trial forward pass reproduces the model's own output.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from reduce_ops.grouped_conv import WideInputGrad
from reduce_ops.models import ThresholdReLU
from reduce_ops.poolfirst import Tracer, activations_before_pools
from reduce_ops.training import one_channel_view

SHARED, CHANNELS, STACKED = "shared", "channels", "stacked"
# shared:   [B, ...], the same for every chip (the input, until the first layer with weights)
# channels: [B, K*C, ...], chip k's channels are k*C..(k+1)*C-1 (convolutions, pooling, BN)
# stacked:  [K, B, ...] (linear layers)


class NotBatchable(Exception):
    """The model has a node or a parameter the batched computation does not know."""


WEIGHTED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
PER_CHANNEL = (nn.ReLU, ThresholdReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
               nn.Identity)
ELEMENTWISE = {operator.add, operator.iadd, torch.add, operator.mul, torch.relu, F.relu}


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = torch.fx.GraphModule(model, Tracer().trace(model))
    except Exception as exc:              # noqa: BLE001 — any tracing failure: one by one
        raise NotBatchable(f"torch.fx cannot trace the model ({type(exc).__name__})") from None
    modules = dict(graph.named_modules())
    for node in graph.graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, nn.Flatten):
                if mod.start_dim != 1 or mod.end_dim != -1:
                    raise NotBatchable(f"{node.target}: flatten other than from dim 1")
            elif isinstance(mod, nn.Conv2d):
                if mod.padding_mode != "zeros":
                    raise NotBatchable(f"{node.target}: padding mode {mod.padding_mode}")
            elif isinstance(mod, nn.BatchNorm2d):
                if mod.momentum is None or not mod.track_running_stats or not mod.affine:
                    raise NotBatchable(f"{node.target}: BatchNorm without momentum/stats/affine")
            elif isinstance(mod, nn.Dropout):
                if mod.p > 0:
                    raise NotBatchable(f"{node.target}: dropout draws per chip")
            elif not isinstance(mod, (*WEIGHTED, *PER_CHANNEL)):
                raise NotBatchable(f"{node.target}: {type(mod).__name__}")
        elif node.op == "call_function":
            if node.target is torch.flatten:
                if node.args[1:] not in ((1,),) or node.kwargs:
                    raise NotBatchable("torch.flatten other than from dim 1")
            elif node.target not in ELEMENTWISE:
                raise NotBatchable(f"function {getattr(node.target, '__name__', node.target)}")
        elif node.op in ("call_method", "get_attr"):
            raise NotBatchable(f"{node.op} {node.target}")
    owned = {f"{name}.{p}" for name, mod in graph.named_modules() if isinstance(mod, WEIGHTED)
             for p, _ in mod.named_parameters(recurse=False)}
    if {n for n, _ in model.named_parameters()} != owned:
        raise NotBatchable("parameters outside Conv2d, Linear and BatchNorm2d")
    return graph


def batchable(model: nn.Module) -> str:
    """'' when `model` can train batched, else why not (one phrase)."""
    try:
        _trace(model)
    except NotBatchable as why:
        return str(why)
    return ""


def _to(x: torch.Tensor, layout: str, want: str, k: int) -> torch.Tensor:
    """x from one layout into another (see SHARED, CHANNELS, STACKED)."""
    if layout == want:
        return x
    if layout == SHARED:
        if want == CHANNELS:
            return x.repeat(1, k, *([1] * (x.dim() - 2)))
        return x.unsqueeze(0).expand(k, *x.shape)
    if layout == STACKED and want == CHANNELS:           # [K, B, C, ...] -> [B, K*C, ...]
        return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])
    if layout == CHANNELS and want == STACKED:           # [B, K*C, ...] -> [K, B, C, ...]
        return x.reshape(x.shape[0], k, -1, *x.shape[2:]).transpose(0, 1)
    raise AssertionError(f"{layout} -> {want}")


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t [N, C, H, W] in the channels-last layout; with one channel (a grayscale input, a
    depthwise filter) viewed so (training.one_channel_view), for the convolution to answer
    channels-last too (LeNet, 8 chips batched: training 1.13x, evaluation 1.22x, against
    converting its output)."""
    return one_channel_view(t).contiguous(memory_format=torch.channels_last)


class StackedModel:
    """K copies of `baseline` (its weights and BatchNorm statistics, each copy its own):
    `forward(x [B, ...])` gives logits [K, B, classes]; `model(k)` copy k as a plain module."""

    def __init__(self, baseline: nn.Module, k: int, device: torch.device | str = "cpu") -> None:
        self.baseline, self.k = baseline, k
        self.training = False
        self.graph = _trace(baseline)
        self.layers = dict(self.graph.named_modules())
        self.relu_after_pool = self._relu_after_pool()
        self.params = nn.ParameterDict()       # "<module>.<param>" with '.' -> ':' as keys
        self.stats: dict[str, torch.Tensor] = {}
        for name, mod in self.layers.items():
            if not isinstance(mod, WEIGHTED):
                continue
            for p, value in mod.named_parameters(recurse=False):
                stacked = value.detach().to(device).unsqueeze(0).repeat(
                    k, *([1] * value.dim())).contiguous()
                self.params[f"{name}.{p}".replace(".", ":")] = nn.Parameter(stacked)
            if isinstance(mod, nn.BatchNorm2d):
                for b in ("running_mean", "running_var"):
                    self.stats[f"{name}.{b}"] = getattr(mod, b).detach().to(device).repeat(
                        k, 1).contiguous()
                self.stats[f"{name}.num_batches_tracked"] = mod.num_batches_tracked.clone()

    def _relu_after_pool(self) -> dict[str, nn.Module]:
        """{max-pool node: the activation right before it}, for every activation whose only
        reader is a max-pool: the pool then runs first and the activation after it, on a
        quarter of the values (reduce_ops.poolfirst: exact; 1.35x a LeNet step here)."""
        return {pool: self.layers[act.target] for pool, act in
                activations_before_pools(self.graph.graph, self.layers).items()}

    def _p(self, module: str, name: str) -> torch.Tensor:
        return self.params[f"{module}.{name}".replace(".", ":")]

    def _conv(self, name: str, mod: nn.Conv2d, x: torch.Tensor, layout: str) -> torch.Tensor:
        k = self.k
        weight = self._p(name, "weight").reshape(k * mod.out_channels, *mod.weight.shape[1:])
        bias = self._p(name, "bias").reshape(-1) if mod.bias is not None else None
        groups = mod.groups
        if layout == SHARED and groups > 1:
            x, layout = _to(x, SHARED, CHANNELS, k), CHANNELS
        if layout != SHARED:
            x, groups = _to(x, layout, CHANNELS, k), groups * k
        x, weight = _channels_last(x), _channels_last(weight)
        if WideInputGrad.pays(x, weight, mod, groups):
            out = WideInputGrad.apply(x, weight, bias, mod.padding, groups)
        else:
            out = F.conv2d(x, weight, bias, mod.stride, mod.padding, mod.dilation, groups)
        # Channels-last out, as later layers want it: max-pooling 48 channels of 28x28 took
        # 4.8 ms NCHW against 0.4 channels-last (batch 32). A no-op where the input was
        # channels-last; else one copy (1.7x the batched evaluation, 1.15x its training).
        return out.contiguous(memory_format=torch.channels_last)

    def _linear(self, name: str, mod: nn.Linear, x: torch.Tensor, layout: str) -> torch.Tensor:
        weight = self._p(name, "weight")                        # [K, out, in]
        bias = self._p(name, "bias") if mod.bias is not None else None
        if layout == SHARED:
            if x.dim() != 2:
                raise NotBatchable(f"{name}: a linear layer on {x.dim()}-d input")
            out = x @ weight.reshape(-1, mod.in_features).t()   # [B, K*out]
            if bias is not None:
                out = out + bias.reshape(-1)
            return _to(out, CHANNELS, STACKED, self.k)
        x = _to(x, layout, STACKED, self.k)
        if x.dim() != 3:
            raise NotBatchable(f"{name}: a linear layer on {x.dim() - 1}-d input")
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def _batch_norm(self, name: str, mod: nn.BatchNorm2d, x: torch.Tensor,
                    layout: str) -> torch.Tensor:
        x = _to(x, layout, CHANNELS, self.k)
        mean, var = self.stats[f"{name}.running_mean"], self.stats[f"{name}.running_var"]
        if self.training:
            self.stats[f"{name}.num_batches_tracked"] += 1
        return F.batch_norm(x, mean.view(-1), var.view(-1), self._p(name, "weight").reshape(-1),
                            self._p(name, "bias").reshape(-1), self.training, mod.momentum,
                            mod.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [K, B, classes] of every chip's model on the batch x [B, ...]."""
        env: dict[str, tuple[Any, str]] = {}

        def arg(a: Any) -> Any:
            return env[a.name] if isinstance(a, torch.fx.Node) else (a, None)

        out = None
        for node in self.graph.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = (x, SHARED)
            elif node.op == "call_module":
                (value, layout), mod = arg(node.args[0]), self.layers[node.target]
                if isinstance(mod, nn.Conv2d):
                    env[node.name] = (self._conv(node.target, mod, value, layout), CHANNELS)
                elif isinstance(mod, nn.Linear):
                    env[node.name] = (self._linear(node.target, mod, value, layout), STACKED)
                elif isinstance(mod, nn.BatchNorm2d):
                    env[node.name] = (self._batch_norm(node.target, mod, value, layout),
                                      CHANNELS)
                elif isinstance(mod, nn.Flatten):
                    env[node.name] = self._flatten(value, layout)
                elif isinstance(mod, nn.Dropout):
                    env[node.name] = (value, layout)
                else:                                   # per channel: pooling, activations
                    if layout == STACKED and value.dim() > 3:
                        value, layout = _to(value, STACKED, CHANNELS, self.k), CHANNELS
                    if any(u.name in self.relu_after_pool for u in node.users) \
                            and mod in self.relu_after_pool.values():
                        env[node.name] = (value, layout)      # runs after the pool
                        continue
                    value = mod(value)
                    if node.name in self.relu_after_pool:
                        value = self.relu_after_pool[node.name](value)
                    env[node.name] = (value, layout)
            elif node.op == "call_function":
                if node.target is torch.flatten:
                    env[node.name] = self._flatten(*arg(node.args[0]))
                else:
                    env[node.name] = self._elementwise(node, arg)
            elif node.op == "output":
                value, layout = arg(node.args[0])
                out = _to(value, layout, STACKED, self.k)
        return out

    def _flatten(self, x: torch.Tensor, layout: str) -> tuple[torch.Tensor, str]:
        if layout == SHARED:
            return x.flatten(1), SHARED
        x = _to(x, layout, STACKED, self.k)
        return x.flatten(2), STACKED

    def _elementwise(self, node: torch.fx.Node, arg: Any) -> tuple[torch.Tensor, str]:
        args = [arg(a) for a in node.args]
        layouts = {lay for _, lay in args if lay is not None}
        want = SHARED if layouts == {SHARED} else CHANNELS if CHANNELS in layouts else STACKED
        values = [_to(v, lay, want, self.k) if lay is not None else v for v, lay in args]
        target = operator.add if node.target is operator.iadd else node.target
        return target(*values, **node.kwargs), want

    def model(self, k: int) -> nn.Module:
        """Chip k's model as a plain copy of the baseline."""
        model = copy.deepcopy(self.baseline).to(next(iter(self.params.values())).device)
        state = {name.replace(":", "."): value[k].detach().clone()
                 for name, value in self.params.items()}
        for name, value in self.stats.items():
            state[name] = value if value.dim() == 0 else value[k].clone()
        model.load_state_dict({**model.state_dict(), **state})
        return model.eval()



def forward_flops(model: nn.Module, sample: torch.Tensor) -> float:
    """FLOPs (2 x the multiply-adds) of every convolution and linear layer of `model` for one
    input shaped as `sample`'s first (measured with forward hooks, in eval mode)."""
    total = 0.0

    def hook(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += 2.0 * module.in_features * module.out_features * (out[0].numel()
                                                                       // module.out_features)
        else:                                  # a convolution: per output element
            total += 2.0 * module.weight[0].numel() * out[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample[:1])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total


def stackable(baseline: nn.Module, sample: torch.Tensor) -> str:
    """'' when `baseline` can be stacked: traced, every node known, and two stacked copies
    reproduce its output on `sample` (a few inputs) in eval mode; else why not."""
    reason = batchable(baseline)
    if reason:
        return reason
    try:
        net = StackedModel(baseline, 2, sample.device)
        was = baseline.training
        baseline.eval()
        with torch.no_grad():
            got, want = net.forward(sample), baseline(sample)
        baseline.train(was)
    except NotBatchable as why:
        return str(why)
    except Exception as exc:             # noqa: BLE001 — any failure: one by one
        return f"a stacked forward pass failed ({type(exc).__name__})"
    if got.shape[1:] != want.shape or not all(
            torch.allclose(g, want, rtol=1e-3, atol=1e-4) for g in got):
        return "a stacked forward pass does not reproduce the model's output"
    return ""

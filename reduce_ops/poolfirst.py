"""An activation whose only reader is a max-pool runs after that pool, on a quarter of the
values (2x2 pooling), with the same answer to the bit.

Exact for a monotone activation that maps everything at or below its threshold to 0 (ReLU, a
ThresholdReLU with threshold >= 0): it commutes with max, so the values are the same; and the
gradient reaches the same element with the same value (a window whose maximum is above the
threshold routes it to the same first maximum either way, any other window passes 0), so the
weights trained through either order are the same to the bit (tests/test_poolfirst.py).
Neither op does arithmetic, so no rounding moves either. LeNet-5 one by one here, one thread
(`benchmarks/bench_poolfirst.py --repeats 9`): evaluation 1.08x, int8 evaluation 1.09x, an
epoch of the baseline's training loop 1.04x.

`pool_first(model)` is the model as torch.fx traces it with those activations moved, built on
the model's own submodules (training it trains the model). `StackedModel` runs its chips'
activations after their pools by the same rule.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx
from torch import nn

from reduce_ops.models import ThresholdReLU


class Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with the project's own activation kept as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ThresholdReLU) or super().is_leaf_module(m, module_qualified_name)


def _activation(module: nn.Module | None) -> bool:
    return isinstance(module, nn.ReLU) or (isinstance(module, ThresholdReLU)
                                           and module.threshold >= 0)


def activations_before_pools(graph: torch.fx.Graph, modules: Mapping[str, nn.Module]
                             ) -> dict[str, torch.fx.Node]:
    """{max-pool node name: the activation node right before it} for every activation whose
    only reader is a max-pool (without indices) that pools it."""
    out = {}
    for node in graph.nodes:
        act = modules.get(node.target) if node.op == "call_module" else None
        if not _activation(act) or len(node.users) != 1:
            continue
        (user,) = node.users
        pool = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(pool, nn.MaxPool2d) and not pool.return_indices and user.args[0] is node \
                and node not in user.args[1:] and node not in user.kwargs.values():
            out[user.name] = node
    return out


def _trace(model: nn.Module) -> torch.fx.Graph | None:
    """The model's graph, or None where torch.fx cannot trace it or what it traces depends on
    the train/eval mode (a forward that reads `self.training` outside torch's own modules:
    the traced code would keep one branch for good)."""
    was = model.training
    try:
        graphs = []
        for mode in (True, False):
            model.train(mode)
            graphs.append(Tracer().trace(model))
    except Exception:                    # noqa: BLE001 — any tracing failure: the model as is
        return None
    finally:
        model.train(was)
    return graphs[0] if str(graphs[0]) == str(graphs[1]) else None


def pool_first(model: nn.Module) -> nn.Module:
    """`model` with every activation that only a max-pool reads run after the pool (exact, see
    above), on the same submodules and parameters; `model` itself where there is none or the
    model cannot be traced. Its parameters() are the model's; enumerate them from the model."""
    graph = _trace(model)
    if graph is None:
        return model
    modules = dict(model.named_modules())
    moves = activations_before_pools(graph, modules)
    if not moves:
        return model
    for node in list(graph.nodes):
        act = moves.get(node.name)
        if act is None:
            continue
        # act(x) -> pool(act)   becomes   pool(x) -> act(pool)
        node.replace_all_uses_with(act)
        node.args = (act.args[0], *node.args[1:])
        act.args = (node, *act.args[1:])
        node.append(act)
    graph.lint()
    fast = torch.fx.GraphModule(model, graph, class_name=f"{type(model).__name__}PoolFirst")
    fast.train(model.training)
    return fast

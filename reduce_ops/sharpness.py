"""Sharpness-aware training (SAM, SAQ) and a flatness measure of a trained model.

SAM (Foret et al., 2021): each step takes the gradient g at the weights w, ascends to the
worst-case weights within radius rho, w + e with e = rho * g / ||g|| (one L2 norm over every
parameter that has a gradient), takes the gradient there, and steps *from w* with it.

SAQ (Liu et al., 2021, "case 3"): the same with the int8 quantizer in the loop. The forward pass
reads the quantized weights Q(w) (reduce_ops.quant, straight-through estimator); the ascent is
taken from the gradient with respect to the quantized weights and added *after* the quantizer,
Q(w) + e, so a perturbation smaller than one quantization step is not rounded away. Parameters
that are not quantized (biases, normalization) are perturbed as in SAM.

Flatness: the mean loss increase when every weight is perturbed by Gaussian noise of standard
deviation `sigma` times its own magnitude (seeded draws on a fixed sample of training images).
Relative noise makes the measure blind to rescalings that leave the function unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from reduce_ops.errors import ConfigError
from reduce_ops.poolfirst import pool_first
from reduce_ops.quant import QuantizedWeights

METHODS = ("none", "sam", "saq")


def check_method(method: str, rho: float, key: str = "train") -> None:
    """One line naming the key for an unknown method or a negative radius."""
    if method not in METHODS:
        raise ConfigError(f"{key}.sharpness: expected one of {', '.join(METHODS)}, got {method!r}")
    if not rho >= 0:
        raise ConfigError(f"{key}.rho: must be >= 0, got {rho}")


class SharpnessAware:
    """The two-pass SAM / SAQ update around any optimizer.

    With `quantized` (installed on the model while training) the ascent of the mapped weights is
    added after their quantizer (SAQ); without it every parameter is perturbed in place (SAM).
    Batch-norm running statistics are restored after the second pass, so they follow the data
    once per step as in plain training.
    """

    def __init__(self, model: nn.Module, rho: float,
                 quantized: QuantizedWeights | None = None) -> None:
        check_method("saq" if quantized is not None else "sam", rho)
        self.model = model
        self.rho = float(rho)
        self.quantized = quantized
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []   # (parameter, its w) moved
        self._perturbed = False

    # ---------------------------------------------------------------- the ascent
    def _quantized_masters(self) -> dict[int, str]:
        if self.quantized is None:
            return {}
        if not self.quantized.installed:
            raise ConfigError("train.sharpness: saq needs the quantized weights installed")
        return {id(p): name for name, p in self.quantized.master_weights().items()}

    @torch.no_grad()
    def ascend(self) -> float:
        """Move to w + e (SAQ: Q(w) + e for the quantized weights) from the gradients now in
        .grad; returns ||e|| (rho, or 0 where every gradient is zero)."""
        if self._perturbed:
            raise RuntimeError("ascend() twice without descend()")
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = self.rho / norm if norm > 0 else torch.zeros_like(norm)
        quantized = self._quantized_masters()
        after_quantizer: dict[str, torch.Tensor] = {}
        for p in params:
            e = p.grad * scale
            if id(p) in quantized:
                after_quantizer[quantized[id(p)]] = e
            else:
                self._saved.append((p, p.detach().clone()))
                p.add_(e)
        if self.quantized is not None:
            self.quantized.set_perturbations(after_quantizer)
        self._perturbed = True
        return float(norm * scale)

    @torch.no_grad()
    def descend(self) -> None:
        """Back to w, bit for bit (the saved values copied back)."""
        for p, w in self._saved:
            p.copy_(w)
        self._saved.clear()
        if self.quantized is not None:
            self.quantized.set_perturbations(None)
        self._perturbed = False

    # ---------------------------------------------------------------- one step
    def step(self, loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
             after_backward: Callable[[], None] | None = None) -> float:
        """One SAM/SAQ update; `loss_fn` runs the forward pass on the current batch. Returns the
        loss at w (what plain training reports). `after_backward` (e.g. zeroing the gradients of
        bypassed weights) runs after both backward passes, so it shapes the ascent as well."""
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        if after_backward is not None:
            after_backward()
        buffers = _norm_buffers(self.model)
        self.ascend()
        try:
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            if after_backward is not None:
                after_backward()
        finally:
            self.descend()
            _restore(buffers)
        optimizer.step()
        return loss.item()


def _norm_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the running statistics of every batch-norm layer."""
    out = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            out.extend((b, b.detach().clone()) for b in module.buffers())
    return out


@torch.no_grad()
def _restore(buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for buffer, copy in buffers:
        buffer.copy_(copy)


# --------------------------------------------------------------------------- flatness

@torch.no_grad()
def flatness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, draws: int,
             seed: int, batch_size: int = 256) -> dict[str, float]:
    """Loss increase of `model` (eval mode) under relative Gaussian weight noise: every draw
    adds sigma * |w| * N(0, 1) to each weight, measures the mean cross-entropy on (x, y), and
    restores the weights. Returns {'flatness_loss_increase': mean increase over draws (higher =
    sharper), 'flatness_loss_increase_std', 'flatness_clean_loss', 'flatness_noisy_accuracy'}.
    """
    if sigma <= 0 or draws < 1:
        raise ConfigError(f"flatness: sigma must be > 0 and draws >= 1, got {sigma}, {draws}")
    was_training = model.training
    model.eval()
    forward = pool_first(model)          # the same answers; the noise follows model's params

    def loss_and_accuracy() -> tuple[float, float]:
        total, correct = 0.0, 0
        for start in range(0, len(y), batch_size):
            logits = forward(x[start:start + batch_size])
            yb = y[start:start + batch_size]
            total += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
            correct += int((logits.argmax(1) == yb).sum())
        return total / len(y), correct / len(y)

    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    clean, _ = loss_and_accuracy()
    increases, accuracies = [], []
    try:
        for _ in range(draws):
            noise = [torch.randn(p.shape, generator=gen).to(p) * p.abs() * sigma for p in params]
            for p, n in zip(params, noise):
                p.add_(n)
            try:
                loss, acc = loss_and_accuracy()
            finally:
                for p, w in zip(params, saved):
                    p.copy_(w)
            increases.append(loss - clean)
            accuracies.append(acc)
    finally:
        model.train(was_training)
    inc = torch.tensor(increases, dtype=torch.float64)
    return {"flatness_loss_increase": float(inc.mean()),
            "flatness_loss_increase_std": float(inc.std()) if draws > 1 else 0.0,
            "flatness_clean_loss": clean,
            "flatness_noisy_accuracy": float(sum(accuracies) / len(accuracies))}

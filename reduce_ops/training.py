"""Train / evaluate loops, baseline training with early stopping, and fault-aware training."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from reduce_ops.config import FatConfig, TrainConfig
from reduce_ops.hardware import build_masks


class PreparedDataLike(Protocol):
    """Anything with x/y dicts of tensors keyed by split name (reduce_ops.data.PreparedData)."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(model: nn.Module, cfg: TrainConfig | FatConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam over all parameters, weight decay as configured."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless stream of shuffled index batches, one fresh permutation per epoch."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             device: torch.device | str = "cpu") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on in-memory tensors, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size].to(device, non_blocking=True)
        yb = y[start:start + batch_size].to(device, non_blocking=True)
        logits = model(xb)
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    n = max(len(y), 1)
    return correct / n, loss_sum / n


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift] pixels.

    x: [N, C, H, W]; edges are replicated (the background of digit-like images). Vectorised:
    one padded copy, then one gather of every sample's window.
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, mode="replicate")   # [N, C, H+2s, W+2s]
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1, 1), generator=generator)
    rows = dy + torch.arange(h).view(1, h, 1)                               # [N, H, 1]
    cols = dx + torch.arange(w).view(1, 1, w)                               # [N, 1, W]
    out = padded.permute(0, 2, 3, 1)[torch.arange(n).view(n, 1, 1), rows, cols]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, index_stream: Iterator[torch.Tensor], n_steps: int,
                device: torch.device | str = "cpu",
                after_backward: Callable[[], None] | None = None,
                after_step: Callable[[], None] | None = None,
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Run `n_steps` optimizer steps on batches from `index_stream`; returns the mean loss."""
    model.train()
    loss_sum = 0.0
    for _ in range(n_steps):
        idx = next(index_stream)
        xb = x[idx] if augment is None else augment(x[idx])
        xb, yb = xb.to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.item()
    return loss_sum / max(n_steps, 1)


# --------------------------------------------------------------------------- baseline

@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_accuracy: float
    val_loss: float
    seconds: float


@dataclass
class PretrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False


def pretrain(model: nn.Module, data: PreparedDataLike, cfg: TrainConfig,
             device: torch.device | str = "cpu",
             on_epoch: Callable[[EpochRecord], None] | None = None) -> PretrainResult:
    """Train until validation accuracy plateaus (patience) or max_epochs; keeps the best weights."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = data.x["train"], data.y["train"]
    stream = batches(len(y), cfg.batch_size, gen)
    optimizer = make_optimizer(model, cfg)
    result = PretrainResult()
    best_state = copy.deepcopy(model.state_dict())
    best = -1.0
    since_best = 0
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    augment = (lambda xb: random_shift(xb, cfg.augment_shift, aug_gen)) \
        if cfg.augment_shift > 0 else None
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        loss = train_steps(model, optimizer, x, y, stream,
                           steps_per_epoch(len(y), cfg.batch_size), device, augment=augment)
        val_acc, val_loss = evaluate(model, data.x["val"], data.y["val"], device=device)
        rec = EpochRecord(epoch, loss, val_acc, val_loss, time.perf_counter() - t0)
        result.history.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
        if val_acc > best + cfg.min_delta:
            best, since_best = val_acc, 0
            result.best_epoch, result.best_val_accuracy = epoch, val_acc
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if since_best >= cfg.patience:
                result.stopped_early = True
                break
    model.load_state_dict(best_state)
    return result


# --------------------------------------------------------------------------- fault-aware training

def _masked_params(model: nn.Module, masks: dict[str, torch.Tensor],
                   device: torch.device | str) -> list[tuple[nn.Parameter, torch.Tensor]]:
    params = dict(model.named_parameters())
    unknown = set(masks) - set(params)
    if unknown:
        raise KeyError(f"masks name parameters the model does not have: {sorted(unknown)[:3]}")
    # Float keep-masks (1 = keep, 0 = faulty PE): one in-place multiply per tensor per step.
    return [(params[name], m.to(device=device, dtype=params[name].dtype))
            for name, m in masks.items()]


@torch.no_grad()
def apply_fault_masks(pairs: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """FAP: weights on faulty PEs become exactly 0."""
    for p, keep in pairs:
        p.mul_(keep)


@dataclass
class FatCheckpoint:
    amount: float          # retraining epochs done when measured
    step: int              # optimizer steps done
    metrics: dict[str, float]
    seconds: float         # wall time of training so far (evaluation excluded)


def checkpoint_steps(amounts: Sequence[float], n_per_epoch: int) -> list[int]:
    """Retraining amounts (epochs, fractional) -> optimizer-step counts (rounded)."""
    return [int(round(a * n_per_epoch)) for a in amounts]


def fault_aware_train(model: nn.Module, masks: dict[str, torch.Tensor], data: PreparedDataLike,
                      epochs: float, cfg: FatConfig, device: torch.device | str = "cpu",
                      checkpoints: Sequence[float] = (),
                      evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                      on_checkpoint: Callable[[FatCheckpoint], None] | None = None,
                      ) -> list[FatCheckpoint]:
    """Fine-tune with masked weights held at exactly zero (FAT), for `epochs` (fractional).

    The masked weights are zeroed before training, their gradients are zeroed before every step
    (so momentum buffers, Adam moments and weight decay never move them) and the weights are
    re-zeroed after every step. `evaluate_fn(model)` runs at every amount in `checkpoints`
    (epochs, 0 allowed) within this ONE run, giving the accuracy curve without retraining.
    """
    # Checked before the model is touched: a rejected call leaves the caller's weights as they were.
    n_per_epoch = steps_per_epoch(len(data.y["train"]), cfg.batch_size)
    total = int(round(epochs * n_per_epoch))
    marks = sorted(set(zip(checkpoint_steps(checkpoints, n_per_epoch), checkpoints)))
    if any(s > total for s, _ in marks):
        raise ValueError(f"a checkpoint lies beyond the {epochs} epochs of training")
    if any(a < 0 for a in checkpoints):
        raise ValueError(f"a checkpoint amount is negative: {sorted(checkpoints)[0]}")
    model.to(device)
    pairs = _masked_params(model, masks, device)
    apply_fault_masks(pairs)

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = batches(len(data.y["train"]), cfg.batch_size, gen)
    optimizer = make_optimizer(model, cfg)

    def zero_masked_grads() -> None:
        for p, keep in pairs:
            if p.grad is not None:
                p.grad.mul_(keep)

    def rezero() -> None:
        apply_fault_masks(pairs)

    out: list[FatCheckpoint] = []
    done, train_seconds = 0, 0.0

    def measure(step: int, amount: float) -> None:
        metrics = evaluate_fn(model) if evaluate_fn is not None else {}
        cp = FatCheckpoint(amount, step, metrics, train_seconds)
        out.append(cp)
        if on_checkpoint is not None:
            on_checkpoint(cp)

    for step, amount in marks:
        if out and out[-1].step == step:
            # Another amount that rounds to the same optimizer step: same model, same metrics.
            cp = FatCheckpoint(amount, step, dict(out[-1].metrics), train_seconds)
            out.append(cp)
            if on_checkpoint is not None:
                on_checkpoint(cp)
            continue
        t0 = time.perf_counter()
        train_steps(model, optimizer, data.x["train"], data.y["train"], stream, step - done,
                    device, zero_masked_grads, rezero)
        train_seconds += time.perf_counter() - t0
        done = step
        measure(step, amount)
    if done < total:
        t0 = time.perf_counter()
        train_steps(model, optimizer, data.x["train"], data.y["train"], stream, total - done,
                    device, zero_masked_grads, rezero)
        train_seconds += time.perf_counter() - t0
    model.eval()
    return out


def split_accuracies(model: nn.Module, data: PreparedDataLike,
                     splits: Sequence[str] = ("val", "test"),
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """{'<split>_accuracy': accuracy} per split: what trials, chips and policies report."""
    return {f"{s}_accuracy": evaluate(model, data.x[s], data.y[s], device=device)[0]
            for s in splits}


def fap_then_fat(baseline: nn.Module, fault_map: Any, layer_types: Sequence[str],
                 data: PreparedDataLike, epochs: float, cfg: FatConfig,
                 device: torch.device | str = "cpu", checkpoints: Sequence[float] = (),
                 evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 ) -> tuple[nn.Module, dict[str, torch.Tensor], list[FatCheckpoint]]:
    """A copy of the baseline pruned by `fault_map` (FAP), then fault-aware trained (FAT).

    The baseline itself is left untouched. Returns (model, keep-masks, checkpoints).
    """
    model = copy.deepcopy(baseline).to(device)
    masks = build_masks(model, fault_map, layer_types)
    cps = fault_aware_train(model, masks, data, epochs, cfg, device, checkpoints, evaluate_fn)
    return model, masks, cps

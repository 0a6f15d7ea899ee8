"""Fault-aware training (FAT): fine-tuning with the weights on faulty PEs held at exactly zero."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reduce_ops.config import FatConfig
from reduce_ops.errors import ConfigError
from reduce_ops.hardware import MaskedWeights, build_masks, pruned_fraction
from reduce_ops.poolfirst import pool_first
from reduce_ops.training import (
    Measurement,
    PreparedDataLike,
    batches,
    make_optimizer,
    measure_splits,
    reference,
    steps_per_epoch,
    train_steps,
)


@dataclass
class FatCheckpoint:
    amount: float          # retraining epochs done when measured
    step: int              # optimizer steps done
    metrics: dict[str, float]
    seconds: float         # wall time of training so far (evaluation excluded)


def checkpoint_steps(amounts: Sequence[float], n_per_epoch: int) -> list[int]:
    """Retraining amounts (epochs, fractional) -> optimizer-step counts (rounded)."""
    return [int(round(a * n_per_epoch)) for a in amounts]


def batch_stream(data: PreparedDataLike, cfg: FatConfig) -> tuple[int, Iterator[torch.Tensor]]:
    """(optimizer steps per epoch, the endless stream of shuffled index batches) of a FAT run
    with `cfg`, torch's global seed set to cfg.seed too: every run with one seed reads the same
    batches (what lets chips train batched, reduce_ops.batched, and hand on)."""
    torch.manual_seed(cfg.seed)
    return (steps_per_epoch(len(data.y["train"]), cfg.batch_size),
            batches(len(data.y["train"]), cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))


class Bypass:
    """Faulty PEs bypassed (hardware.fault_model: bypass): every weight on one acts as zero.

    The masked weights are zeroed at the start (FAP), their gradients are zeroed before every
    step (so momentum buffers, Adam moments and weight decay never move them) and the weights are
    re-zeroed after every step.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks
        self.masked = MaskedWeights(model, masks)

    @property
    def affected_fraction(self) -> float:
        """Fraction of mapped weights on faulty PEs (here: pruned)."""
        return pruned_fraction(self.masks)

    def attach(self) -> None:
        self.masked.apply()

    def after_backward(self) -> None:
        self.masked.zero_grads()

    def after_step(self) -> None:
        self.masked.apply()

    def release(self) -> None:
        """Nothing to undo: the zeros are the model's own weights."""


class StuckAt:
    """Faulty PEs whose weight registers have stuck bits (hardware.fault_model: stuck_at).

    Every mapped weight runs as int8 (per output channel), read through the chip's stuck bits:
    each forward pass quantizes the float master weights and forces the stuck bits, and the
    backward pass hands the gradient to the masters unchanged (straight-through estimator), so
    FAT trains through the forced bits the chip will read. `release` takes the quantization off:
    the model is then the float masters (what is saved; the chip quantizes them again).
    """

    def __init__(self, model: nn.Module, stuck: Any, layer_types: Sequence[str]) -> None:
        from reduce_ops.quant import QuantizedWeights

        self.stuck = stuck
        self.masks = build_masks(model, stuck.faulty.numpy(), layer_types)   # weights affected
        # looked up by parameter name, so built before the quantization renames the weights
        self.quantized = QuantizedWeights(model, layer_types, stuck.stuck_bits(model,
                                                                               layer_types))

    @property
    def affected_fraction(self) -> float:
        """Fraction of mapped weights on PEs with stuck bits."""
        return pruned_fraction(self.masks)

    def attach(self) -> None:
        self.quantized.install()

    def after_backward(self) -> None:
        """Nothing: the master weights learn; the stuck bits are forced when read."""

    def after_step(self) -> None:
        """Nothing (see after_backward)."""

    def release(self) -> None:
        self.quantized.remove()


class FatSession:
    """Fault-aware training (FAT) of one model that can be continued.

    `faults` is how the chip's faulty PEs act (Bypass: weights held at zero; StuckAt: int8
    weights with forced bits, trained through with a straight-through estimator).
    `advance(amount)` trains up to `amount` epochs (fractional: 0.25 = a quarter of an epoch's
    optimizer steps) and can be called again: advancing to 1 and then to 2 epochs gives exactly
    the model of one 2-epoch run (same batches, same optimizer state), so a trial or a chip can
    be measured, then continued.
    """

    def __init__(self, model: nn.Module, faults: dict[str, torch.Tensor] | Bypass | StuckAt,
                 data: PreparedDataLike, cfg: FatConfig,
                 device: torch.device | str = "cpu",
                 paired: dict[str, torch.Tensor] | None = None) -> None:
        self.paired = paired or {}     # the baseline's per-image correctness, per split
        self.model = model.to(device)
        self.faults = faults if isinstance(faults, (Bypass, StuckAt)) else Bypass(model, faults)
        self.masks = self.faults.masks
        self.data, self.cfg, self.device = data, cfg, device
        self.faults.attach()
        self._forward = pool_first(self.model)    # trains and answers as the model, faster
        self.n_per_epoch, self._stream = batch_stream(data, cfg)
        self.optimizer = make_optimizer(self.model, cfg)
        self.steps = 0
        self.train_seconds = 0.0

    @classmethod
    def from_baseline(cls, baseline: nn.Module, fault_map: Any, layer_types: Sequence[str],
                      data: PreparedDataLike, cfg: FatConfig, device: torch.device | str = "cpu",
                      stuck: Any = None,
                      paired: dict[str, torch.Tensor] | None = None) -> FatSession:
        """A copy of the baseline (left untouched) on a chip: `fault_map`'s PEs bypassed, or,
        given the chip's stuck bits (`stuck`, a hardware.bitfaults.PeStuckMap), read through
        them. Measurements are paired with the baseline's per-image correctness on the
        validation and test splits (`paired`, from training.reference; measured here when not
        given)."""
        if paired is None:
            paired = reference(baseline, data, [s for s in ("val", "test") if s in data.y],
                               device)
        model = copy.deepcopy(baseline).to(device)
        faults = (StuckAt(model, stuck, layer_types) if stuck is not None
                  else Bypass(model, build_masks(model, fault_map, layer_types)))
        return cls(model, faults, data, cfg, device, paired)

    def release(self) -> nn.Module:
        """The model as it is saved: for stuck-at chips, the float masters without the
        quantization (the session cannot train on after this)."""
        self.faults.release()
        return self.model

    @property
    def amount(self) -> float:
        """Epochs of FAT done so far."""
        return self.steps / self.n_per_epoch

    @property
    def pruned_fraction(self) -> float:
        """Fraction of mapped weights on faulty PEs (pruned, or read with stuck bits)."""
        return self.faults.affected_fraction

    def advance(self, amount: float) -> None:
        """Train on until `amount` epochs of FAT are done in all."""
        target = int(round(amount * self.n_per_epoch))
        if amount < 0 or target < self.steps:
            raise ConfigError(f"retraining amount {amount:g} epochs: FAT is already at "
                              f"{self.amount:g} epochs and cannot go back")
        if target == self.steps:
            return
        t0 = time.perf_counter()
        train_steps(self._forward, self.optimizer, self.data.x["train"], self.data.y["train"],
                    self._stream, target - self.steps, self.device, self.faults.after_backward,
                    self.faults.after_step)
        self.train_seconds += time.perf_counter() - t0
        self.steps = target
        self.model.eval()

    def accuracies(self, splits: Sequence[str]) -> dict[str, float]:
        """{'<split>_accuracy': accuracy} of the model as it is now."""
        return {f"{s}_accuracy": m.accuracy for s, m in self.measure(splits).items()}

    def measure(self, splits: Sequence[str]) -> dict[str, Measurement]:
        """{split: Measurement} of the model as it is now, paired with the baseline."""
        return measure_splits(self._forward, self.data, splits, self.device, self.paired)

    def checkpoints(self, amounts: Sequence[float],
                    evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                    on_checkpoint: Callable[[FatCheckpoint], None] | None = None,
                    ) -> list[FatCheckpoint]:
        """Advance through `amounts` (ascending), calling evaluate_fn(model) at each one.

        Amounts that round to the same optimizer step are all reported, measured once.
        """
        out: list[FatCheckpoint] = []
        for step, amount in sorted(set(zip(checkpoint_steps(amounts, self.n_per_epoch),
                                           amounts))):
            if out and out[-1].step == step:
                metrics = dict(out[-1].metrics)
            else:
                self.advance(amount)
                metrics = evaluate_fn(self.model) if evaluate_fn is not None else {}
            cp = FatCheckpoint(amount, step, metrics, self.train_seconds)
            out.append(cp)
            if on_checkpoint is not None:
                on_checkpoint(cp)
        return out


def fault_aware_train(model: nn.Module, masks: dict[str, torch.Tensor], data: PreparedDataLike,
                      epochs: float, cfg: FatConfig, device: torch.device | str = "cpu",
                      checkpoints: Sequence[float] = (),
                      evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                      on_checkpoint: Callable[[FatCheckpoint], None] | None = None,
                      ) -> list[FatCheckpoint]:
    """Fine-tune `model` in place with masked weights held at exactly zero, for `epochs`.

    `evaluate_fn(model)` runs at every amount in `checkpoints` (epochs, 0 allowed) within this
    ONE run, giving the accuracy curve without retraining.
    """
    # Checked before the model is touched: a rejected call leaves the caller's weights as they were.
    if any(a < 0 for a in checkpoints):
        raise ConfigError(f"a checkpoint amount is negative: {sorted(checkpoints)[0]:g} epochs")
    n_per_epoch = steps_per_epoch(len(data.y["train"]), cfg.batch_size)
    if any(s > int(round(epochs * n_per_epoch))
           for s in checkpoint_steps(checkpoints, n_per_epoch)):
        raise ConfigError(f"a checkpoint lies beyond the {epochs:g} epochs of training")
    session = FatSession(model, masks, data, cfg, device)
    cps = session.checkpoints(checkpoints, evaluate_fn, on_checkpoint)
    session.advance(epochs)
    model.eval()
    return cps


@dataclass
class FatCurve:
    """A fault map's FAP + FAT run measured at several amounts: what a resilience trial, a chip
    and a compared policy each read. `extend` continues the same run."""

    session: FatSession
    splits: tuple[str, ...]
    amounts: list[float]
    measured: dict[str, list[Measurement]]   # split -> its Measurement at each amount
    train_seconds: list[float]         # FAT wall time done at each amount
    seconds: float                     # FAP + FAT + evaluation wall time

    @property
    def accuracy(self) -> dict[str, list[float]]:
        """'<split>_accuracy' -> accuracy at each amount."""
        return {f"{s}_accuracy": [m.accuracy for m in ms] for s, ms in self.measured.items()}

    def at(self, amount: float, key: str) -> float:
        """Accuracy `key` (e.g. 'test_accuracy') at one of the measured amounts."""
        return self.accuracy[key][self.amounts.index(amount)]

    def extend(self, amounts: Sequence[float],
               on_checkpoint: Callable[[FatCheckpoint], None] | None = None) -> None:
        """Train on from the last measured amount, measuring at each of `amounts` (ascending,
        beyond the last): the same model as one run measured at all of them."""
        t0 = time.perf_counter()
        s = self.session
        kept: list[dict[str, Measurement]] = []

        def evaluate_fn(model: nn.Module) -> dict[str, float]:
            kept.append(s.measure(self.splits))
            return {f"{k}_accuracy": m.accuracy for k, m in kept[-1].items()}

        def record(cp: FatCheckpoint) -> None:     # right after each checkpoint's evaluation
            self.amounts.append(cp.amount)
            for split in self.splits:       # an amount that rounds to the step before repeats it
                self.measured[split].append(kept[-1][split])
            self.train_seconds.append(cp.seconds)
            if on_checkpoint is not None:
                on_checkpoint(cp)

        s.checkpoints(amounts, evaluate_fn, record)
        self.seconds += time.perf_counter() - t0


def fat_curve(baseline: nn.Module, fault_map: Any, layer_types: Sequence[str],
              data: PreparedDataLike, amounts: Sequence[float], cfg: FatConfig,
              device: torch.device | str = "cpu", splits: Sequence[str] = ("val", "test"),
              on_checkpoint: Callable[[FatCheckpoint], None] | None = None,
              stuck: Any = None, paired: dict[str, torch.Tensor] | None = None) -> FatCurve:
    """A copy of the baseline on the chip (`fault_map` bypassed, or its `stuck` bits), then ONE
    FAT run up to max(amounts) with the accuracy of every split in `splits` measured at each
    amount (0 = before any retraining)."""
    t0 = time.perf_counter()
    session = FatSession.from_baseline(baseline, fault_map, layer_types, data, cfg, device,
                                       stuck, paired)
    curve = FatCurve(session, tuple(splits), [], {s: [] for s in splits}, [], 0.0)
    curve.extend(sorted(set(amounts)), on_checkpoint)
    curve.seconds = time.perf_counter() - t0
    return curve

"""K chips' fault-aware training as ONE computation (reduce_ops.stacked): one batch stream,
one optimizer step over the stacked weights.

Chips that train the same model on the same batches (same FAT seed) differ only in their
weights and masks. One SGD/Adam step over the stacked tensors is every chip's own step (both
are element-wise; the loss is the sum of the chips' mean losses, so each chip's gradient is its
own), so each chip's weights equal its one-by-one training within float rounding, not to the
bit. Measured here (LeNet-5, MNIST subset, 8 chips, one thread, `benchmarks/bench_throughput.py
--repeats 5`, 2026-12-02): 1.89x the training images per second of one by one (0.44 of the
machine's matmul rate), 2.28x the evaluation. Models that cannot be stacked, and stuck-at
hardware, train one by one.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from reduce_ops.config import FatConfig
from reduce_ops.fault_aware import FatSession, batch_stream
from reduce_ops.hardware import build_masks
from reduce_ops.shipping import Measurement
from reduce_ops.stacked import StackedModel, forward_flops, stackable
from reduce_ops.training import (
    PreparedDataLike,
    make_optimizer,
    reference,
)


class BatchedFat:
    """Bypass FAT of K chips (each its masks) from one baseline, one batch stream, one step.

    `advance(amount)` and `measure(splits)` work as a FatSession's do, for every chip at once;
    `session(k)` hands chip k on as a FatSession (weights, optimizer state, batch stream and
    steps), which trains on alone exactly as if it had been one from the start."""

    def __init__(self, baseline: nn.Module, masks: Sequence[dict[str, torch.Tensor]],
                 data: PreparedDataLike, cfg: FatConfig, device: torch.device | str = "cpu",
                 paired: dict[str, torch.Tensor] | None = None) -> None:
        self.baseline, self.data, self.cfg, self.device = baseline, data, cfg, device
        self.k = len(masks)
        self.paired = paired or {}
        self.net = StackedModel(baseline, self.k, device)
        self.params = self.net.params
        self.masks = list(masks)
        self.keep = {}
        for key in masks[0]:
            for m in masks:
                if set(m) != set(masks[0]):
                    raise ValueError("every chip's masks must cover the same parameters")
            self.keep[key.replace(".", ":")] = torch.stack(
                [m[key].to(device=device, dtype=torch.float32) for m in masks])
        self._apply_masks()
        self.n_per_epoch, self._stream = batch_stream(data, cfg)
        # one fused kernel per stacked tensor: 2.6 -> 1.3 ms of a ~35 ms LeNet step (8 chips)
        self.optimizer = make_optimizer(self.params, cfg, fused_sgd=True)
        self.steps = 0
        self.train_seconds = 0.0

    @classmethod
    def from_baseline(cls, baseline: nn.Module, fault_maps: Sequence[Any],
                      layer_types: Sequence[str], data: PreparedDataLike, cfg: FatConfig,
                      device: torch.device | str = "cpu",
                      paired: dict[str, torch.Tensor] | None = None) -> BatchedFat:
        """Every fault map's chip (its faulty PEs bypassed) from one baseline, measured paired
        with the baseline's per-image correctness (measured here when not given)."""
        if paired is None:
            paired = reference(baseline, data, [s for s in ("val", "test") if s in data.y],
                               device)
        return cls(baseline, [build_masks(baseline, f, layer_types) for f in fault_maps], data,
                   cfg, device, paired)

    # -- training and measuring --------------------------------------------------------------
    @torch.no_grad()
    def _apply_masks(self) -> None:
        for key, keep in self.keep.items():
            self.params[key].mul_(keep)

    @property
    def amount(self) -> float:
        return self.steps / self.n_per_epoch

    def advance(self, amount: float) -> None:
        """Train every chip on until `amount` epochs of FAT are done in all."""
        target = round(amount * self.n_per_epoch)
        if target < self.steps:
            raise ValueError(f"batched FAT is at {self.amount:g} epochs, cannot go back to "
                             f"{amount:g}")
        t0 = time.perf_counter()
        self.net.training = True
        x_all, y_all = self.data.x["train"], self.data.y["train"]
        for _ in range(target - self.steps):
            idx = next(self._stream)
            xb, yb = x_all[idx].to(self.device), y_all[idx].to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.net.forward(xb)                              # [K, B, classes]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.repeat(self.k),
                                   reduction="sum") / len(yb)
            loss.backward()
            for key, keep in self.keep.items():
                self.params[key].grad.mul_(keep)
            self.optimizer.step()
            self._apply_masks()
        self.net.training = False
        self.train_seconds += time.perf_counter() - t0
        self.steps = target

    @torch.no_grad()
    def correct(self, split: str) -> torch.Tensor:
        """Per-image correctness [K, N] of every chip's model on `split`, in batches of 512
        chip-images (64 images for 8 chips; LeNet here: 63,600 chip-images/s, against 58,900
        at 32 images and 37,400 at 256)."""
        x, y = self.data.x[split], self.data.y[split]
        batch_size = max(1, 512 // self.k)
        right = [(self.net.forward(x[s:s + batch_size].to(self.device)).argmax(-1)
                  == y[s:s + batch_size].to(self.device)).cpu()
                 for s in range(0, len(y), batch_size)]
        return torch.cat(right, 1) if right else torch.zeros(self.k, 0, dtype=torch.bool)

    def measure(self, splits: Sequence[str]) -> list[dict[str, Measurement]]:
        """Per chip, {split: Measurement} paired with the baseline, as FatSession.measure."""
        out: list[dict[str, Measurement]] = [{} for _ in range(self.k)]
        for s in splits:
            correct = self.correct(s)
            for i in range(self.k):
                out[i][s] = Measurement.of(correct[i], self.paired.get(s))
        return out

    # -- handing a chip on -------------------------------------------------------------------
    def model(self, k: int) -> nn.Module:
        """Chip k's model as a plain copy of the baseline."""
        return self.net.model(k)

    def session(self, k: int) -> FatSession:
        """Chip k as a FatSession at this point of its training."""
        model = self.model(k)
        s = FatSession(model, self.masks[k], self.data, self.cfg, self.device, self.paired)
        state = self.optimizer.state_dict()
        names = [n.replace(".", ":") for n, _ in model.named_parameters()]
        position = {n: i for i, n in enumerate(self.params.keys())}
        per_chip = {"state": {}, "param_groups": s.optimizer.state_dict()["param_groups"]}
        for i, n in enumerate(names):
            kept = state["state"].get(position[n])
            if kept is None:
                continue
            per_chip["state"][i] = {key: (v[k].clone() if torch.is_tensor(v) and v.dim() > 0
                                          else copy.deepcopy(v)) for key, v in kept.items()}
        s.optimizer.load_state_dict(per_chip)
        for _ in range(self.steps):                  # the same batches from here on
            next(s._stream)
        s.steps = self.steps
        s.train_seconds = self.train_seconds / self.k
        return s


def chunks(keys: Sequence[Any], size: int, workers: int = 1) -> list[list[int]]:
    """Indices of the units in chunks of at most `size` that train together: only units of the
    same key (their FAT seed) share a chunk, in order, and each key's units are split as
    evenly as `size` allows (11 trials of one seed at size 8: 6 and 5, not 8 and 3). Where the
    units allow, as many chunks as a multiple of `workers`, so that no worker waits through
    the last round alone (100 chips at 8 on 2 workers: 14 chunks of 7 or 8, not 13)."""
    by_key: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    n = {key: -(-len(idx) // max(size, 1)) for key, idx in by_key.items()}
    while sum(n.values()) % max(workers, 1):
        key = max(by_key, key=lambda k: len(by_key[k]) / n[k])   # the largest chunks split
        if len(by_key[key]) <= n[key]:
            break                                                  # one unit each already
        n[key] += 1
    out = []
    for key, idx in by_key.items():
        cut = [round(j * len(idx) / n[key]) for j in range(n[key] + 1)]
        out += [idx[a:b] for a, b in itertools.pairwise(cut)]
    return out


# On a CPU, stacking pays only while one chip's batch is too little work to keep a core busy.
# Measured here (8 chips against one by one, one thread, batch 64, 1x28x28 inputs, AVX2): LeNet
# 1.4 MFLOP per image 1.33x, LeNet-like nets of 2.1 / 7.0 / 25.5 MFLOP 1.09x / 0.92x / 0.74x,
# VGG11 190 MFLOP 0.63x (its evaluation 0.68x): break-even near 4 MFLOP.
CPU_MAX_MFLOP = 3.0


def batch_size(exe_batch: int, baseline: nn.Module, stuck: bool, sample: torch.Tensor,
               device: torch.device | str = "cpu") -> int:
    """How many units train as one: execution.batch where the faulty PEs are bypassed, the
    model can be stacked (reproducing its output on `sample`, a few inputs) and, on a CPU, its
    forward pass is at most CPU_MAX_MFLOP per image; else 1 (one by one)."""
    if exe_batch <= 1 or stuck:
        return 1
    if (torch.device(device).type == "cpu"
            and forward_flops(baseline, sample) > CPU_MAX_MFLOP * 1e6):
        return 1
    return 1 if stackable(baseline, sample) else exe_batch

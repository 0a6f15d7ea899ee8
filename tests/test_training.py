"""Baseline training learns; the plateau rule stops it and restores the best weights."""

from __future__ import annotations

import dataclasses

import torch

from reduce_ops.config import Config
from reduce_ops.models import build_model
from reduce_ops.training import evaluate, pretrain


def test_pretrain_on_digits_learns(tiny_cfg: Config, prepared_digits) -> None:
    torch.manual_seed(tiny_cfg.train.seed)
    model = build_model("lenet", prepared_digits.input_shape, prepared_digits.num_classes)
    chance = 1.0 / prepared_digits.num_classes
    before, _ = evaluate(model, prepared_digits.x["test"], prepared_digits.y["test"])
    result = pretrain(model, prepared_digits, tiny_cfg.train)
    after, _ = evaluate(model, prepared_digits.x["test"], prepared_digits.y["test"])
    assert before < 0.3 and after > 0.85 > 5 * chance
    # The returned model holds the best epoch's weights: its val accuracy is the recorded best.
    val, _ = evaluate(model, prepared_digits.x["val"], prepared_digits.y["val"])
    assert val == result.best_val_accuracy
    assert [r.epoch for r in result.history] == list(range(1, len(result.history) + 1))


def test_plateau_stops_early(tiny_cfg: Config, prepared_digits) -> None:
    # A zero learning rate never improves: training stops after `patience` extra epochs.
    cfg = dataclasses.replace(tiny_cfg.train, lr=1e-12, max_epochs=20, patience=2)
    model = build_model("mlp", prepared_digits.input_shape, prepared_digits.num_classes)
    result = pretrain(model, prepared_digits, cfg)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1


def test_random_shift_translates_each_image_by_its_own_offset() -> None:
    from reduce_ops.training import random_shift

    x = torch.zeros(64, 2, 9, 9)
    x[:, :, 4, 4] = torch.arange(1, 65, dtype=torch.float32).view(64, 1)  # one bright pixel
    out = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = [divmod(int(out[i, 0].flatten().argmax()), 9) for i in range(64)]
    assert all(2 <= r <= 6 and 2 <= c <= 6 for r, c in pos)        # moved at most 2 pixels
    assert len(set(pos)) > 5                                        # offsets differ per image
    assert torch.equal(out[:, 0], out[:, 1])                        # channels move together
    assert torch.equal(out.amax(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)))  # nothing lost
    assert random_shift(x, 0, torch.Generator()) is x

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

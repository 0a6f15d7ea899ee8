"""Baseline training learns; the plateau rule stops it and restores the best weights."""

from __future__ import annotations

import dataclasses

import torch

from reduce_ops.baseline import early_stop_split, pretrain
from reduce_ops.config import Config
from reduce_ops.models import build_model
from reduce_ops.training import evaluate


def test_pretrain_on_digits_learns(tiny_cfg: Config, prepared_digits) -> None:
    torch.manual_seed(tiny_cfg.train.seed)
    model = build_model("lenet", prepared_digits.input_shape, prepared_digits.num_classes)
    chance = 1.0 / prepared_digits.num_classes
    before, _ = evaluate(model, prepared_digits.x["test"], prepared_digits.y["test"])
    result = pretrain(model, prepared_digits, tiny_cfg.train)
    after, _ = evaluate(model, prepared_digits.x["test"], prepared_digits.y["test"])
    assert before < 0.3 and after > 0.85 > 5 * chance
    # The returned model holds the best epoch's weights: its accuracy on the early-stopping
    # holdout (carved from the training split) is the recorded best.
    _, holdout = early_stop_split(prepared_digits.y["train"],
                                  tiny_cfg.train.early_stop_fraction, tiny_cfg.train.seed)
    acc, _ = evaluate(model, prepared_digits.x["train"][holdout],
                      prepared_digits.y["train"][holdout])
    assert acc == result.best_holdout_accuracy and result.n_holdout == len(holdout)
    assert [r.epoch for r in result.history] == list(range(1, len(result.history) + 1))


def test_early_stopping_never_reads_the_validation_split(tiny_cfg: Config,
                                                         prepared_digits) -> None:
    """The validation split decides every later question, so picking the baseline must not
    depend on it: scrambling its labels changes nothing in training."""
    import copy

    scrambled = copy.copy(prepared_digits)
    object.__setattr__(scrambled, "y", {**prepared_digits.y,
                                        "val": prepared_digits.y["val"].flip(0)})
    weights = []
    for data in (prepared_digits, scrambled):
        torch.manual_seed(tiny_cfg.train.seed)
        model = build_model("lenet", data.input_shape, data.num_classes)
        pretrain(model, data, dataclasses.replace(tiny_cfg.train, max_epochs=3))
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_early_stop_split_is_stratified_and_disjoint(prepared_digits) -> None:
    y = prepared_digits.y["train"]
    fit, holdout = early_stop_split(y, 0.1, 0)
    assert len(set(fit.tolist()) & set(holdout.tolist())) == 0
    assert len(fit) + len(holdout) == len(y)
    assert abs(len(holdout) - 0.1 * len(y)) <= 1
    counts = torch.bincount(y[holdout], minlength=10).float()
    assert (counts - torch.bincount(y, minlength=10).float() * 0.1).abs().max() <= 1.0


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

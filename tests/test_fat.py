"""Fault-aware training: masked weights stay exactly 0, amounts are fractional epochs, one run
gives every checkpoint, retraining recovers accuracy, and at fault rate 0 it is plain
fine-tuning."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import tiny_params
from torch import nn

from reduce_ops import fault_aware
from reduce_ops.baseline import pretrain
from reduce_ops.config import Config, FatConfig, from_dict
from reduce_ops.errors import ConfigError
from reduce_ops.fault_aware import fault_aware_train
from reduce_ops.hardware import (
    ArrayGeometry,
    apply_masks,
    build_masks,
    pruned_fraction,
    uniform_fault_map,
)
from reduce_ops.models import build_model
from reduce_ops.training import (
    batches,
    evaluate,
    make_optimizer,
    steps_per_epoch,
    train_steps,
)

GEOMETRY = ArrayGeometry(16, 16)  # small array: even LeNet's 6-channel conv loses weights
FAULT_SEED = 0                    # fault-map seed, separate from the training seeds


# tiny models: a second intra-op thread only adds waiting on a busy machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def baseline(prepared_digits) -> nn.Module:
    """LeNet pretrained briefly on digits (about 0.9 test accuracy); tests deep-copy it."""
    cfg = from_dict(tiny_params()).train
    cfg = dataclasses.replace(cfg, max_epochs=5)
    torch.manual_seed(cfg.seed)
    model = build_model("lenet", prepared_digits.input_shape, prepared_digits.num_classes)
    pretrain(model, prepared_digits, cfg)
    return model.eval()


def fresh(baseline: nn.Module) -> nn.Module:
    return copy.deepcopy(baseline)


def faulty_masks(model: nn.Module, rate: float, seed: int = FAULT_SEED) -> dict[str, torch.Tensor]:
    return build_masks(model, uniform_fault_map(GEOMETRY, rate, seed).faulty)


def accuracy_of(model: nn.Module, data) -> float:
    """Test-split accuracy."""
    return evaluate(model, data.x["test"], data.y["test"])[0]


@pytest.fixture
def spy_optimizer(monkeypatch: pytest.MonkeyPatch):
    """Wrap the optimizer fault_aware_train builds; `spy.after_step(opt)` hooks run after every
    optimizer.step() and before FAT's own re-zeroing, `spy.steps` counts the steps."""

    class Spy:
        optimizers: list[torch.optim.Optimizer] = []
        steps = 0
        after_step: list = []

    real = fault_aware.make_optimizer

    def wrapped(model: nn.Module, cfg) -> torch.optim.Optimizer:
        opt = real(model, cfg)
        Spy.optimizers.append(opt)

        def post(optimizer, args, kwargs) -> None:
            Spy.steps += 1
            for fn in Spy.after_step:
                fn(optimizer)

        opt.register_step_post_hook(post)
        return opt

    Spy.optimizers, Spy.steps, Spy.after_step = [], 0, []
    monkeypatch.setattr(fault_aware, "make_optimizer", wrapped)
    return Spy


# --------------------------------------------------------------------------- masked weights stay 0

@pytest.mark.parametrize("optimizer,lr,weight_decay", [("sgd", 0.01, 0.01), ("adam", 1e-3, 0.01)])
def test_masked_weights_stay_exactly_zero(tiny_cfg: Config, prepared_digits, baseline,
                                          spy_optimizer, optimizer, lr, weight_decay) -> None:
    cfg = dataclasses.replace(tiny_cfg.fat, optimizer=optimizer, lr=lr, momentum=0.9,
                              weight_decay=weight_decay)
    model = fresh(baseline)
    masks = faulty_masks(model, 0.3)
    assert 0.2 < pruned_fraction(masks) < 0.4
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}

    # Right after optimizer.step() and BEFORE fault_aware_train re-zeroes, the masked weights are
    # already 0: zeroed gradients keep momentum, Adam moments and weight decay from moving them.
    moved_by_step: list[bool] = []
    spy_optimizer.after_step.append(lambda opt: moved_by_step.append(
        any(bool((params[n][~m] != 0).any()) for n, m in masks.items())))

    fault_aware_train(model, masks, prepared_digits, 0.5, cfg)

    assert spy_optimizer.steps == len(moved_by_step) > 0
    assert not any(moved_by_step)
    (opt,) = spy_optimizer.optimizers
    for name, mask in masks.items():
        p = params[name]
        assert (p[~mask] == 0).all(), name
        # every kept weight trained (none of them was 0 or stuck)
        assert (p[mask] != before[name][mask]).float().mean() > 0.99, name
        state = opt.state[p]
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if key in state:
                assert (state[key][~mask] == 0).all(), (name, key)
    # biases run outside the array: never masked, and they train
    for name, p in params.items():
        if name.endswith(".bias"):
            assert not torch.equal(p, before[name]), name


def test_weights_are_zero_in_every_forward_pass(tiny_cfg: Config, prepared_digits,
                                                baseline) -> None:
    model = fresh(baseline)
    masks = faulty_masks(model, 0.3)
    layers = {"features.0": model.features[0], "classifier.1": model.classifier[1]}
    seen: dict[str, list[bool]] = {name: [] for name in layers}
    handles = [
        module.register_forward_pre_hook(
            lambda mod, args, name=name: seen[name].append(
                bool((mod.weight[~masks[f"{name}.weight"]] == 0).all())))
        for name, module in layers.items()
    ]
    try:
        n_eval = []
        fault_aware_train(model, masks, prepared_digits, 0.5, tiny_cfg.fat,
                          checkpoints=[0.0, 0.25, 0.5],
                          evaluate_fn=lambda m: n_eval.append(1) or {})
    finally:
        for h in handles:
            h.remove()
    n_steps = round(0.5 * steps_per_epoch(len(prepared_digits.y["train"]),
                                          tiny_cfg.fat.batch_size))
    for name, calls in seen.items():
        assert len(calls) == n_steps  # evaluate_fn here runs no forward pass
        assert all(calls), name


# ------------------------------------------------------------------------ amounts and checkpoints

# 1257 samples: 40, 13, 20 and 13 steps per epoch; 0.25 * 13 = 3.25 -> 3, 1.5 * 13 = 19.5 -> 20
@pytest.mark.parametrize("epochs,batch_size",
                         [(0.25, 32), (0.25, 100), (0.3, 64), (1.0, 64), (1.5, 100)])
def test_fractional_epochs_run_rounded_steps(tiny_cfg: Config, prepared_digits, baseline,
                                             spy_optimizer, epochs, batch_size) -> None:
    cfg = dataclasses.replace(tiny_cfg.fat, batch_size=batch_size)
    n = len(prepared_digits.y["train"])
    model = fresh(baseline)
    fault_aware_train(model, faulty_masks(model, 0.2), prepared_digits, epochs, cfg)
    expected = round(epochs * -(-n // batch_size))
    assert spy_optimizer.steps == expected
    assert steps_per_epoch(n, batch_size) == -(-n // batch_size)


def test_checkpoints_come_from_one_run(tiny_cfg: Config, prepared_digits, baseline,
                                       spy_optimizer) -> None:
    cfg = tiny_cfg.fat
    per_epoch = steps_per_epoch(len(prepared_digits.y["train"]), cfg.batch_size)
    model = fresh(baseline)
    masks = faulty_masks(model, 0.3)
    fap = fresh(baseline)
    apply_masks(fap, masks)
    fap_accuracy = accuracy_of(fap, prepared_digits)

    calls: list[int] = []

    def evaluate_fn(m: nn.Module) -> dict[str, float]:
        calls.append(spy_optimizer.steps)  # optimizer steps done when measured
        return {"accuracy": accuracy_of(m, prepared_digits)}

    seen = []
    amounts = [0.0, 0.25, 0.5, 1.0]
    out = fault_aware_train(model, masks, prepared_digits, 1.0, cfg, checkpoints=amounts,
                            evaluate_fn=evaluate_fn, on_checkpoint=seen.append)

    steps = [round(a * per_epoch) for a in amounts]
    assert [cp.amount for cp in out] == amounts
    assert [cp.step for cp in out] == steps
    assert calls == steps                       # evaluated exactly 4 times, at those steps
    assert spy_optimizer.steps == per_epoch     # one run of one epoch, not 0 + 1/4 + 1/2 + 1
    assert seen == out
    assert out[0].metrics["accuracy"] == fap_accuracy  # amount 0 is the FAP model
    assert all(a.seconds <= b.seconds for a, b in zip(out, out[1:]))  # cumulative train time
    assert out[-1].metrics["accuracy"] == accuracy_of(model, prepared_digits)

    # Measuring along the way does not change the training: same weights as a run without.
    plain = fresh(baseline)
    assert fault_aware_train(plain, masks, prepared_digits, 1.0, cfg) == []
    for a, b in zip(model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("checkpoints", [[0.0, 0.75], [-0.25]])
def test_checkpoint_outside_training_is_an_error(tiny_cfg: Config, prepared_digits, baseline,
                                                 checkpoints) -> None:
    model = fresh(baseline)
    with pytest.raises(ConfigError, match="checkpoint"):
        fault_aware_train(model, faulty_masks(model, 0.3), prepared_digits, 0.5, tiny_cfg.fat,
                          checkpoints=checkpoints, evaluate_fn=lambda m: {})
    # rejected before anything happened: the caller's model is untouched (no FAP applied)
    for a, b in zip(model.state_dict().values(), baseline.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- what FAT is for

def test_fat_recovers_accuracy_lost_to_faults(tiny_cfg: Config, prepared_digits,
                                              baseline) -> None:
    base = accuracy_of(baseline, prepared_digits)
    model = fresh(baseline)
    masks = faulty_masks(model, 0.3)
    fap = fresh(baseline)
    apply_masks(fap, masks)
    fap_accuracy = accuracy_of(fap, prepared_digits)
    assert base > 0.85
    assert fap_accuracy < base - 0.1  # the faults hurt measurably

    fault_aware_train(model, masks, prepared_digits, 2.0, tiny_cfg.fat)
    fat_accuracy = accuracy_of(model, prepared_digits)
    assert fat_accuracy > fap_accuracy + 0.15  # measured: 0.59 -> 0.84
    for name, mask in masks.items():
        assert (dict(model.named_parameters())[name][~mask] == 0).all()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rate_zero_is_plain_fine_tuning(tiny_cfg: Config, prepared_digits, baseline,
                                        optimizer) -> None:
    cfg: FatConfig = dataclasses.replace(tiny_cfg.fat, optimizer=optimizer,
                                         lr=0.01 if optimizer == "sgd" else 1e-3)
    model = fresh(baseline)
    masks = faulty_masks(model, 0.0)
    assert all(bool(m.all()) for m in masks.values()) and pruned_fraction(masks) == 0.0
    fault_aware_train(model, masks, prepared_digits, 0.75, cfg)

    # Plain fine-tuning with the same seed, batch order and optimizer, no masks at all.
    plain = fresh(baseline)
    torch.manual_seed(cfg.seed)
    stream = batches(len(prepared_digits.y["train"]), cfg.batch_size,
                     torch.Generator().manual_seed(cfg.seed))
    n_steps = round(0.75 * steps_per_epoch(len(prepared_digits.y["train"]), cfg.batch_size))
    train_steps(plain, make_optimizer(plain, cfg), prepared_digits.x["train"],
                prepared_digits.y["train"], stream, n_steps)

    trained = False
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
        trained |= not torch.equal(a, baseline.state_dict()[name])
    assert trained


def test_amounts_on_the_same_step_each_get_a_checkpoint(tiny_cfg, prepared_digits) -> None:
    """Amounts that round to one optimizer step are all reported, measured once."""
    from reduce_ops.fault_aware import fault_aware_train
    from reduce_ops.models import build_model

    model = build_model("lenet", prepared_digits.input_shape, prepared_digits.num_classes)
    calls = []
    cps = fault_aware_train(model, {}, prepared_digits, 0.5, tiny_cfg.fat,
                            checkpoints=[0.0, 0.25, 0.2501, 0.5],
                            evaluate_fn=lambda m: calls.append(1) or {"acc": float(len(calls))})
    assert [c.amount for c in cps] == [0.0, 0.25, 0.2501, 0.5]
    assert cps[1].step == cps[2].step and cps[1].metrics == cps[2].metrics
    assert len(calls) == 3


def test_extending_a_run_is_the_same_as_one_long_run(tiny_cfg: Config, prepared_digits,
                                                     baseline) -> None:
    """Measure past the grid: a FAT run measured to 0.5 epochs and then continued to 1.0 gives
    exactly the accuracies and weights of one run measured at all amounts."""
    from reduce_ops.fault_aware import fat_curve

    fmap = uniform_fault_map(GEOMETRY, 0.3, FAULT_SEED)
    amounts = [0.0, 0.25, 0.5, 0.75, 1.0]
    one = fat_curve(baseline, fmap, ("conv", "linear"), prepared_digits, amounts, tiny_cfg.fat)
    two = fat_curve(baseline, fmap, ("conv", "linear"), prepared_digits, amounts[:3], tiny_cfg.fat)
    two.extend(amounts[3:])
    assert two.amounts == one.amounts == amounts
    assert two.accuracy == one.accuracy
    for (name, a), b in zip(one.session.model.state_dict().items(),
                            two.session.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_trial_past_the_grid_is_the_same_run_going_on(tiny_cfg: Config, prepared_digits,
                                                       baseline) -> None:
    """A resilience trial that has not settled at the bar by the grid's end trains on, in
    checkpoint steps, to the budget cap: its curve up to the grid is the grid trial's, and the
    whole curve is that of one run measured to where it stopped."""
    from reduce_ops import resilience
    from reduce_ops.fault_aware import fat_curve
    from reduce_ops.hardware import GENERATORS

    res = dataclasses.replace(tiny_cfg.resilience, max_epochs=0.5, checkpoint_every=0.25,
                              confirm_epochs=0.5)
    hw = dataclasses.replace(tiny_cfg.hardware, rows=16, cols=16)
    spec = resilience.trial_grid(dataclasses.replace(res, fault_rates=[0.3], repetitions=1))[0]
    unreachable = resilience.TrialTarget(level=1.01, cap=1.25, confirm=0.5)   # never settles
    grid_only = resilience.TrialTarget(level=0.0, cap=1.25, confirm=0.0)      # settled at once
    long = resilience.run_trial(baseline, prepared_digits, spec, res, tiny_cfg.fat, hw,
                                unreachable)
    short = resilience.run_trial(baseline, prepared_digits, spec, res, tiny_cfg.fat, hw,
                                 grid_only)
    assert short.amounts == [0.0, 0.25, 0.5] and not short.extended
    assert long.amounts == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25] and long.extended
    assert long.val_accuracy[:3] == short.val_accuracy
    fmap = GENERATORS[res.generator](ArrayGeometry(16, 16), spec.fault_rate, spec.fault_seed)
    fat = dataclasses.replace(tiny_cfg.fat, seed=tiny_cfg.fat.seed + spec.repetition)
    one = fat_curve(baseline, fmap, hw.layer_types, prepared_digits, long.amounts, fat)
    assert one.accuracy["val_accuracy"] == long.val_accuracy
    # the test split only reports: measured once, on the trial's final model
    assert one.accuracy["test_accuracy"][-1] == long.test_accuracy[-1]
    assert all(math.isnan(v) for v in long.test_accuracy[:-1])

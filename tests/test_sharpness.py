"""SAM / SAQ steps, activation sparsity and the flatness measure, on tiny models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import make_project
from torch import nn

from reduce_ops.baseline import pretrain
from reduce_ops.cli import main
from reduce_ops.models import ThresholdReLU, activation_sparsity, build_model
from reduce_ops.quant import QuantizedWeights, channel_scale
from reduce_ops.sharpness import SharpnessAware, flatness
from reduce_ops.training import batches, make_optimizer, train_steps


def _tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 10))


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_sam_with_rho_zero_is_plain_training_step_for_step(prepared_digits, tiny_cfg) -> None:
    x, y = prepared_digits.x["train"], prepared_digits.y["train"]
    for optimizer_name in ("sgd", "adam"):
        cfg = dataclasses.replace(tiny_cfg.train, optimizer=optimizer_name)
        plain, sam = _tiny_net(), _tiny_net()
        opt_plain, opt_sam = make_optimizer(plain, cfg), make_optimizer(sam, cfg)
        stream_plain = batches(len(y), 32, torch.Generator().manual_seed(3))
        stream_sam = batches(len(y), 32, torch.Generator().manual_seed(3))
        step = SharpnessAware(sam, rho=0.0)
        for _ in range(5):
            loss_plain = train_steps(plain, opt_plain, x, y, stream_plain, 1)
            loss_sam = train_steps(sam, opt_sam, x, y, stream_sam, 1, sharpness=step)
            assert loss_plain == loss_sam
            for a, b in zip(plain.parameters(), sam.parameters()):
                assert torch.equal(a, b)
            # batch-norm statistics follow the data once per step, as in plain training
            for a, b in zip(plain.buffers(), sam.buffers()):
                assert torch.equal(a, b)


def _gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def test_the_ascent_moves_the_weights_by_exactly_rho(prepared_digits) -> None:
    x, y = prepared_digits.x["train"][:64], prepared_digits.y["train"][:64]
    model = _tiny_net()
    _gradients(model, x, y)
    before = _params(model)
    step = SharpnessAware(model, rho=0.05)
    assert step.ascend() == pytest.approx(0.05, rel=1e-6)
    moved = torch.linalg.vector_norm(torch.cat([(p.detach() - b).ravel() for p, b in
                                                zip(model.parameters(), before)]))
    assert float(moved) == pytest.approx(0.05, rel=1e-5)
    # ... along the gradient: the loss goes up
    grads = [p.grad.clone() for p in model.parameters()]
    assert sum(float((p.detach() - b).mul(g).sum()) for p, b, g in
               zip(model.parameters(), before, grads)) > 0
    step.descend()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)               # back to w bit for bit


def _read_weights(model: nn.Module) -> list[torch.Tensor]:
    """What the forward pass sees for every weight (through parametrizations) and bias."""
    out = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out.append(module.weight.detach().clone())
            if module.bias is not None:
                out.append(module.bias.detach().clone())
    return out


def test_saq_keeps_the_forward_pass_quantized_and_ascends_after_the_quantizer(
        prepared_digits) -> None:
    x, y = prepared_digits.x["train"][:64], prepared_digits.y["train"][:64]
    model = build_model("lenet", prepared_digits.input_shape, 10)
    quantized = QuantizedWeights(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []   # (read weight, master) per forward

    def record(module: nn.Module, _inp: object) -> None:
        master = module.parametrizations.weight.original
        seen.append((module.weight.detach().clone(), master.detach().clone()))

    with quantized:
        layer = quantized.layers["features.0.weight"] if "features.0.weight" in \
            quantized.layers else next(iter(quantized.layers.values()))
        hook = layer.register_forward_pre_hook(record)
        step = SharpnessAware(model, rho=0.05, quantized=quantized)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        step.step(lambda: nn.functional.cross_entropy(model(x), y), optimizer)
        hook.remove()
        # first pass: the int8 grid exactly (read = q * scale with integer q)
        read, master = seen[0]
        scale = channel_scale(master).view(-1, *([1] * (master.dim() - 1)))
        q = read / scale
        assert torch.allclose(q, q.round(), atol=1e-4) and not torch.equal(read, master)
        # second pass: the quantized weights plus the ascent (off the grid)
        assert not torch.allclose(seen[1][0] / scale, (seen[1][0] / scale).round(), atol=1e-4)
        # the ascent is rho in norm, measured on what the forward pass reads
        _gradients(model, x, y)
        before = _read_weights(model)
        assert step.ascend() == pytest.approx(0.05, rel=1e-6)
        after = _read_weights(model)
        moved = torch.linalg.vector_norm(torch.cat([(a - b).ravel()
                                                    for a, b in zip(after, before)]))
        assert float(moved) == pytest.approx(0.05, rel=1e-4)
        step.descend()
        assert all(torch.equal(a, b) for a, b in zip(_read_weights(model), before))
    # the masters are plain parameters again, trained by the step
    assert not any("parametrizations" in name for name, _ in model.named_parameters())


def test_saq_pretraining_runs_and_keeps_float_masters(prepared_digits, tiny_cfg) -> None:
    cfg = dataclasses.replace(tiny_cfg.train, max_epochs=2, sharpness="saq", rho=0.05)
    torch.manual_seed(0)
    model = build_model("lenet", prepared_digits.input_shape, 10)
    result = pretrain(model, prepared_digits, cfg)
    assert len(result.history) == 2 and result.best_holdout_accuracy > 0.5
    assert set(model.state_dict()) == set(build_model("lenet", (1, 8, 8), 10).state_dict())


def test_the_activation_threshold_raises_measured_sparsity(prepared_digits, tiny_cfg) -> None:
    cfg = dataclasses.replace(tiny_cfg.train, max_epochs=3)
    measured = {}
    for threshold in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_model("lenet", prepared_digits.input_shape, 10, threshold)
        assert any(isinstance(m, ThresholdReLU) for m in model.modules()) == (threshold > 0)
        pretrain(model, prepared_digits, cfg)
        measured[threshold] = activation_sparsity(model, prepared_digits.x["val"])
    assert measured[0.5] > measured[0.0] + 0.05


def _linear_pair(a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Linear(a.shape[1], a.shape[0], bias=False),
                          nn.Linear(b.shape[1], b.shape[0], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(a)
        model[1].weight.copy_(b)
    return model


def test_flatness_ranks_a_sharpened_model_above_the_same_function_flat() -> None:
    """f(x) = W x two ways: flat (A = [I; 0], B = [W, 0]) and sharpened (A = [(c+1) I; c I],
    B = [W, -W]): the same outputs, but relative weight noise hits the large cancelling
    weights of the sharpened one far harder."""
    torch.manual_seed(0)
    d, k, c = 6, 3, 50.0
    w = torch.randn(k, d)
    x = torch.randn(400, d)
    y = (x @ w.T).argmax(1)
    eye, zero = torch.eye(d), torch.zeros(d, d)
    flat = _linear_pair(torch.cat([eye, zero]), torch.cat([w, torch.zeros(k, d)], 1))
    sharp = _linear_pair(torch.cat([(c + 1) * eye, c * eye]), torch.cat([w, -w], 1))
    assert torch.allclose(flat(x), sharp(x), atol=1e-3)
    f_flat = flatness(flat, x, y, sigma=0.05, draws=8, seed=1)
    f_sharp = flatness(sharp, x, y, sigma=0.05, draws=8, seed=1)
    assert f_flat["flatness_clean_loss"] == pytest.approx(f_sharp["flatness_clean_loss"],
                                                          abs=1e-3)
    assert f_sharp["flatness_loss_increase"] > 10 * max(f_flat["flatness_loss_increase"], 1e-3)
    # seeded: the same draws give the same number; the weights are restored exactly
    before = copy.deepcopy(sharp.state_dict())
    assert flatness(sharp, x, y, 0.05, 8, 1) == f_sharp
    assert all(torch.equal(before[k_], v) for k_, v in sharp.state_dict().items())


@pytest.mark.parametrize("override, key", [
    ("train.rho=-0.1", "train.rho"),
    ("train.sharpness=asam", "train.sharpness"),
    ("model.activation_threshold=-1", "model.activation_threshold"),
    ("variants=[{name: v, activation_threshold: 0, sharpness: sam, rho: -1}]",
     "variants[0].rho"),
    ("variants=[{name: v, activation_threshold: 0, sharpness: adam, rho: 0.1}]",
     "variants[0].sharpness"),
])
def test_bad_sharpness_settings_are_one_line_naming_the_key(tmp_path, capsys, override,
                                                            key) -> None:
    params = make_project(tmp_path)
    assert main(["pretrain", "--params", str(params), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}:" in err and "Traceback" not in err
    assert not (tmp_path / "models").exists()

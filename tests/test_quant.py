"""Int8 weights: hand-computed quantization, half-step error bound, straight-through gradients,
a model run quantized (exactly its dequantized weights, float again after removal), fresh bit
flips per trial, and fault-aware training through stuck bits that stay forced."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from reduce_ops.config import Config
from reduce_ops.errors import ConfigError, FaultMapError
from reduce_ops.fault_aware import FatSession
from reduce_ops.hardware import ArrayGeometry, MaskedWeights, build_masks, uniform_fault_map
from reduce_ops.hardware.bitfaults import (
    draw_bit_flips,
    draw_model_bit_flips,
    random_pe_stuck_map,
    stuck_at,
)
from reduce_ops.models import build_model
from reduce_ops.quant import (
    QuantizedWeights,
    channel_scale,
    dequantize,
    fake_quantize,
    quantize,
)

GEOMETRY = ArrayGeometry(16, 16)


# tiny models: a second intra-op thread only adds waiting on a busy machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed: int = 0) -> torch.Generator:
    """A fault-seed generator, apart from the training seed."""
    return torch.Generator().manual_seed(seed)


def small_model() -> nn.Module:
    """Conv + BatchNorm + Linear with biases: only the conv and linear weights are mapped."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
    ).eval()


def as_uint8(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


# --- quantization ------------------------------------------------------------------------------


def test_quantize_by_hand():
    weight = torch.tensor([[-1.27, 0.5, 0.01], [0.0, 0.0, 0.0], [2.54, 1.0, -0.3]])
    stored = quantize(weight)
    assert stored.q.dtype == torch.int8
    assert torch.allclose(stored.scale, torch.tensor([0.01, 1.0, 0.02]))  # all-zero row: 1
    assert torch.equal(stored.q, torch.tensor([[-127, 50, 1], [0, 0, 0], [127, 50, -15]],
                                              dtype=torch.int8))
    assert torch.equal(stored.dequantize()[1], torch.zeros(3))


def test_quantization_error_is_at_most_half_a_step_per_weight():
    torch.manual_seed(0)
    # channels of very different ranges, one all zero, one with a single non-zero weight
    weight = torch.randn(16, 3, 3, 3) * torch.logspace(-4, 2, 16).view(-1, 1, 1, 1)
    weight[3] = 0.0
    weight[5] = 0.0
    weight[5, 1, 1, 1] = -0.7
    stored = quantize(weight)
    step = stored.scale.view(-1, 1, 1, 1)
    error = (weight - stored.dequantize()).abs()
    assert (error <= step / 2 * (1 + 1e-5)).all()
    assert stored.q.min() >= -127 and stored.q.max() <= 127
    # every non-zero channel uses the full range: its largest |W| is stored as +-127
    peak = stored.q.abs().reshape(16, -1).amax(1)
    assert torch.equal(peak == 127, torch.arange(16) != 3)
    assert torch.equal(stored.q[3], torch.zeros_like(stored.q[3]))
    assert torch.equal(channel_scale(weight), stored.scale)


def test_quantize_rejects_non_float_weights():
    with pytest.raises(ConfigError, match="float weight"):
        quantize(torch.zeros(2, 2, dtype=torch.int8))


def test_fake_quantize_forward_is_the_int8_read_and_gradient_passes_straight_through():
    torch.manual_seed(1)
    weight = torch.randn(6, 5, requires_grad=True)
    upstream = torch.randn(6, 5)
    masks, _ = stuck_at((6, 5), 0.3, "random", gen(), bits=[7, 6])  # big value changes
    for fault in (None, masks):
        weight.grad = None
        read = fake_quantize(weight, fault)
        stored = quantize(weight)
        expected_q = stored.q if fault is None else fault.apply(stored.q)
        assert torch.equal(read, dequantize(expected_q, stored.scale))
        (read * upstream).sum().backward()
        assert torch.equal(weight.grad, upstream)  # STE: identity, even where bits are stuck


def test_flips_address_weights_by_logical_index_whatever_the_memory_layout():
    torch.manual_seed(2)
    weight = torch.randn(8, 3, 3, 3)
    flips = draw_bit_flips(weight.shape, 0.05, gen())
    channels_last = weight.to(memory_format=torch.channels_last)
    assert torch.equal(fake_quantize(channels_last, flips), fake_quantize(weight, flips))


# --- a model run quantized --------------------------------------------------------------------


def test_quantized_model_runs_exactly_its_dequantized_weights_and_removal_restores_it():
    model = small_model()
    x = torch.randn(5, 3, 8, 8)
    golden = model(x)
    params = dict(model.named_parameters())
    state = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)  # weights replaced by dequantize(quantize(W)) by hand
    with torch.no_grad():
        for name in ("0.weight", "4.weight"):
            dict(reference.named_parameters())[name].copy_(quantize(params[name]).dequantize())

    with QuantizedWeights(model) as qw:
        assert set(qw.layers) == {"0.weight", "4.weight"}
        assert torch.equal(model(x), reference(x))
        assert not torch.equal(model(x), golden)
        assert qw.master_weights()["0.weight"] is params["0.weight"]
        assert torch.equal(model[0].bias, params["0.bias"])  # biases stay float
    assert torch.equal(model(x), golden)  # float again, bit for bit
    assert dict(model.named_parameters()) == params  # the same Parameter objects and names
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not parametrize.is_parametrized(model[0])


def test_ber_zero_is_bit_identical_to_the_clean_quantized_model_and_faults_are_per_trial():
    model = small_model()
    x = torch.randn(5, 3, 8, 8)
    qw = QuantizedWeights(model).install()
    clean = model(x)
    qw.set_faults(draw_model_bit_flips(qw.shapes(), 0.0, gen()))
    assert torch.equal(model(x), clean)
    g = gen(1)
    trials = []
    for _ in range(2):  # each trial: fresh flips of the same stored int8 values
        qw.set_faults(draw_model_bit_flips(qw.shapes(), 0.02, g))
        trials.append(model(x))
        read = qw.read()
        for name, stored in qw.stored().items():
            assert torch.equal(read[name], qw.faults[name].apply(stored.q))
    assert not torch.equal(trials[0], clean) and not torch.equal(trials[0], trials[1])
    with parametrize.cached():  # a trial's evaluation can quantize once for all its batches
        assert torch.equal(model(x), trials[1]) and torch.equal(model(x), trials[1])
    qw.set_faults(None)
    assert torch.equal(model(x), clean)
    qw.remove()


def test_bad_faults_and_double_install_are_clear_errors():
    model = small_model()
    qw = QuantizedWeights(model).install()
    with pytest.raises(FaultMapError, match="'0.bias' is not a mapped weight"):
        qw.set_faults({"0.bias": draw_bit_flips((4,), 0.1, gen())})
    with pytest.raises(FaultMapError, match=r"robustness: fault for '4.weight' has shape \(4, 3"):
        qw.set_faults({"4.weight": draw_bit_flips((4, 3, 3, 3), 0.1, gen())}, key="robustness")
    with pytest.raises(ConfigError, match="already installed"):
        qw.install()
    with pytest.raises(ConfigError, match="already parametrized"):
        QuantizedWeights(model).install()
    qw.remove()


def test_pruned_weights_read_zero_through_quantized_training_steps():
    """FAP masks and STE together: MaskedWeights (built before install) zeroes gradients and
    weights of faulty PEs, so their int8 values stay exactly 0 while the others train."""
    model = small_model().train()
    masks = build_masks(model, uniform_fault_map(ArrayGeometry(4, 4), 0.25, seed=0))
    masked = MaskedWeights(model, masks)
    masked.apply()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    before = {n: w.detach().clone() for n, w in QuantizedWeights(model).master_weights().items()}
    with QuantizedWeights(model) as qw:
        for step in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 3, 8, 8)).square().mean().backward()
            masked.zero_grads()
            optimizer.step()
            masked.apply()
            for name, q in qw.read().items():
                assert (q[~masks[name]] == 0).all()
        for name, weight in qw.master_weights().items():
            assert not torch.equal(weight[masks[name]], before[name][masks[name]])


# --- fault-aware training through stuck bits --------------------------------------------------


def test_training_through_stuck_bits_keeps_them_forced_while_master_weights_learn(
        tiny_cfg: Config, prepared_digits):
    data = prepared_digits
    torch.manual_seed(0)
    model = build_model("lenet", data.input_shape, data.num_classes)
    cfg = dataclasses.replace(tiny_cfg.fat, optimizer="adam", lr=0.003)
    session = FatSession(model, {}, data, cfg)  # stuck-at PEs are read, not bypassed: no masks
    chip = random_pe_stuck_map(GEOMETRY, 0.25, gen(), n_bits=2)  # sign bit possible
    stuck = chip.stuck_bits(model)
    qw = QuantizedWeights(model).install()
    qw.set_faults(stuck)
    masters = qw.master_weights()
    start = {name: w.detach().clone() for name, w in masters.items()}
    assert any(not torch.equal(stuck[n].apply(quantize(w).q), quantize(w).q)
               for n, w in masters.items())  # the faults change what is read

    seen: list[tuple[str, bool, bool]] = []

    def check_int8_seen(module: nn.Module, inputs, name: str) -> None:
        weight = module.weight  # exactly what this forward pass multiplies with
        scale = channel_scale(masters[name])
        q = torch.round(weight / scale.view(-1, *[1] * (weight.dim() - 1))).to(torch.int8)
        on_grid = torch.equal(dequantize(q, scale), weight)  # int8 * scale, nothing else
        forced = ((as_uint8(q) ^ stuck[name].or_mask) & ~stuck[name].and_mask) == 0
        seen.append((name, on_grid, bool(forced.all())))

    hooks = [module.register_forward_pre_hook(
        lambda m, i, name=name: check_int8_seen(m, i, name))
        for name, module in qw.layers.items()]
    accuracy_before = session.accuracies(["val"])["val_accuracy"]
    session.advance(2.0)
    accuracy_after = session.accuracies(["val"])["val_accuracy"]
    for hook in hooks:
        hook.remove()

    n_layers = len(qw.layers)
    assert len(seen) >= n_layers * (session.steps + 2)  # every training and evaluation forward
    assert all(on_grid and forced for _, on_grid, forced in seen)
    assert all(not torch.equal(masters[n], start[n]) for n in masters)  # STE: masters learn
    assert accuracy_after > max(accuracy_before + 0.3, 0.5), (accuracy_before, accuracy_after)
    qw.remove()
    assert dict(model.named_parameters())[next(iter(masters))] is next(iter(masters.values()))

"""A grouped convolution whose input gradient fills the CPU's vectors (the stacked chips' second
and later convolutions, reduce_ops.stacked)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@functools.cache
def vector_width() -> int:
    """fp32 lanes of the CPU kernels torch runs here (16: AVX-512, 8: AVX2; 0: unknown); fixed
    for the process, asked once (`WideInputGrad.pays` runs with every training step)."""
    return {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 0)


class WideInputGrad(torch.autograd.Function):
    """A grouped 'same' convolution (stride 1, odd kernel) whose input gradient is computed
    two columns at a time, so that its few channels per group fill the CPU's vectors.

    The input gradient of a grouped convolution is itself a convolution, with the forward's
    input channels per group as its outputs: LeNet's second convolution stacked gives 6 per
    group, and the CPU kernels pad that to a vector's 16, so it took 3x its forward pass. Here
    each output row's even and odd columns are two outputs of one convolution of stride 2
    along the width (12 channels per group, the kernel one column wider, half the columns),
    interleaved afterwards: the same sums in another order (within float rounding). Measured
    here (AVX-512, 8 LeNet chips, batch 64): 7.9 -> 5.5 ms of a ~37 ms training step. Used
    only where the vector width says it pays (`pays`); the weight gradient is the usual one."""

    @staticmethod
    def pays(x: torch.Tensor, weight: torch.Tensor, mod: nn.Conv2d, groups: int) -> bool:
        if groups == 1 or x.device.type != "cpu" or not (x.requires_grad
                                                         and torch.is_grad_enabled()):
            return False
        kh, kw = weight.shape[-2:]
        same = not isinstance(mod.padding, str) and kh % 2 == 1 and kw % 2 == 1 \
            and tuple(mod.padding) == ((kh - 1) // 2, (kw - 1) // 2)
        if not same or tuple(mod.stride) != (1, 1) or tuple(mod.dilation) != (1, 1) \
                or x.shape[-1] % 2:
            return False
        lanes, per_group = vector_width(), x.shape[1] // groups
        if not lanes:
            return False

        def padded(c: int) -> int:
            return -(-c // lanes) * lanes
        # cost ~ output columns x output channels rounded up to a vector x kernel columns
        return padded(2 * per_group) * (kw + 1) < 0.85 * 2 * padded(per_group) * kw

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int], groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.groups, ctx.has_bias = tuple(padding), groups, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, 1, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_w = grad_b = grad_x = None
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1],
                list(ctx.padding), [1, 1], False, [0, 0], ctx.groups, [False, need_w, need_b])
        if need_x:
            grad_x = input_grad_two_columns(grad, weight, ctx.padding, ctx.groups)
        return grad_x, grad_w, grad_b, None, None


def input_grad_two_columns(grad: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int],
                           groups: int) -> torch.Tensor:
    """The input gradient of a grouped 'same' convolution (see WideInputGrad): a convolution
    of `grad` with the weights transposed and flipped, even and odd output columns as
    separate channels (stride 2 along the width, kernel one column wider)."""
    out_ch, per_group, kh, kw = weight.shape
    per_out = out_ch // groups
    flipped = weight.reshape(groups, per_out, per_group, kh, kw).transpose(1, 2).flip(-2, -1)
    wide = weight.new_zeros(groups, per_group, 2, per_out, kh, kw + 1)
    wide[:, :, 0, :, :, :kw] = flipped                 # even columns
    wide[:, :, 1, :, :, 1:] = flipped                  # odd columns: one column later
    wide = wide.reshape(groups * per_group * 2, per_out, kh, kw + 1)
    out = F.conv2d(grad, wide.contiguous(memory_format=torch.channels_last), None, (1, 2),
                   tuple(padding), 1, groups)          # [B, groups*per_group*2, H, W/2]
    b, c2, h, half = out.shape
    rows = out.permute(0, 2, 3, 1).reshape(b, h, half, c2 // 2, 2).transpose(3, 4)
    return rows.reshape(b, h, 2 * half, c2 // 2).permute(0, 3, 1, 2)   # channels-last

"""Time one SAM step and one SAQ step against one plain training step (the same optimizer,
batch and model) and print one JSON line per model. Goal: a SAM step costs at most 2.1x a plain
step (two forward-backward passes, plus the ascent's norm and copies).

Steps are timed interleaved (plain, SAM, SAQ, plain, ...) so that load from other processes
hits all three alike; the median over repeats is reported.

    python benchmarks/bench_sam.py                       # LeNet on MNIST shape, batch 64
    python benchmarks/bench_sam.py --model vgg11 --shape 3 32 32 --batch 128
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json

import torch
from common import medians_ms
from torch import nn

from reduce_ops.models import build_model
from reduce_ops.quant import QuantizedWeights
from reduce_ops.sharpness import SharpnessAware

GOAL_RATIO = 2.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, *args.shape)
    y = torch.randint(0, 10, (args.batch,))
    models = {m: build_model(args.model, args.shape, 10) for m in ("plain", "sam", "saq")}
    models["sam"].load_state_dict(models["plain"].state_dict())
    models["saq"].load_state_dict(models["plain"].state_dict())
    optimizers = {m: torch.optim.Adam(model.parameters(), lr=1e-3) for m, model in models.items()}
    quantized = QuantizedWeights(models["saq"])
    steps = {"sam": SharpnessAware(models["sam"], args.rho),
             "saq": SharpnessAware(models["saq"], args.rho, quantized)}

    def step(method: str) -> None:
        model, optimizer = models[method], optimizers[method]
        loss_fn = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
        if method == "plain":
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
        else:
            steps[method].step(loss_fn, optimizer)

    with quantized:  # one warm-up step each, then steps interleaved
        for model in models.values():
            model.train()
        ms = medians_ms({m: functools.partial(step, m) for m in models}, args.repeats)
    print(json.dumps({
        "model": args.model, "input": args.shape, "batch": args.batch, "threads": args.threads,
        "repeats": args.repeats, "plain_step_ms": round(ms["plain"], 2),
        "sam_step_ms": round(ms["sam"], 2), "saq_step_ms": round(ms["saq"], 2),
        "sam_ratio": round(ms["sam"] / ms["plain"], 3),
        "saq_ratio": round(ms["saq"] / ms["plain"], 3),
        "goal_sam_ratio_at_most": GOAL_RATIO,
        "sam_goal_met": ms["sam"] / ms["plain"] <= GOAL_RATIO}))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()

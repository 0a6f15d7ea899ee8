"""Time build_masks per chip for VGG11 (CIFAR-10 shape) on a 256x256 array; prints JSON figures."""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from common import times_ms
from torch import nn
from torchvision.models import vgg11

from reduce_ops.hardware import ArrayGeometry, build_masks, generate_fleet, mapped_layers

GOAL_MS = 50.0


def cifar_vgg11(classifier: str) -> nn.Module:
    """torchvision VGG11, 10 classes: "imagenet" keeps the 25088-wide head, "small" is 512 -> 10."""
    model = vgg11(weights=None, num_classes=10)
    if classifier == "small":  # 32x32 input leaves a 1x1x512 feature map
        model.avgpool = nn.Identity()
        model.classifier = nn.Linear(512, 10)
    return model.eval()


def time_build_masks(model: nn.Module, fleet, warmup: int, reuse: bool) -> list[float]:
    """Milliseconds per chip for build_masks after `warmup` untimed calls; reuse: pass out=."""
    warmup = min(warmup, len(fleet))
    chips = iter([*fleet[:warmup], *fleet])
    kept = None  # the masks passed as out= (reuse)

    def build() -> dict[str, torch.Tensor] | None:
        nonlocal kept
        masks = build_masks(model, next(chips), out=kept)
        if any(m.is_cuda for m in masks.values()):
            torch.cuda.synchronize()
        if reuse:
            kept = masks
            return None
        return masks  # the timer frees it before timing the next chip

    return times_ms(build, len(fleet), warmup)


def run(classifier: str, n_chips: int, rate: float, warmup: int, device: str) -> dict:
    """Benchmark one VGG11 variant; returns the figures as a dict."""
    geometry = ArrayGeometry(256, 256)
    model = cifar_vgg11(classifier).to(device)
    fleet = generate_fleet(n_chips, geometry, "uniform", "uniform", rate, rate, seed=0)
    times = time_build_masks(model, fleet, warmup, reuse=False)
    times_reuse = time_build_masks(model, fleet, warmup, reuse=True)
    n_weights = sum(m.weight.numel() for m in mapped_layers(model).values())
    return {
        "model": f"torchvision vgg11, num_classes=10, classifier={classifier}",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "rows": geometry.rows,
        "cols": geometry.cols,
        "n_chips": n_chips,
        "fault_rate": rate,
        "n_mapped_weights": n_weights,
        "ms_per_chip_median": round(statistics.median(times), 2),
        "ms_per_chip_p90": round(float(np.percentile(times, 90)), 2),
        "ms_per_chip_median_reusing_out": round(statistics.median(times_reuse), 2),
        "ms_per_chip_p90_reusing_out": round(float(np.percentile(times_reuse, 90)), 2),
        "goal_ms": GOAL_MS,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse options, run the benchmark for each classifier variant, print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chips", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--classifier", choices=("imagenet", "small", "both"), default="both",
        help="imagenet: torchvision's 25088-4096-4096-10 head; small: Linear(512, 10)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ("imagenet", "small") if args.classifier == "both" else (args.classifier,)
    for classifier in variants:
        figures = run(classifier, args.chips, args.rate, args.warmup, args.device)
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()

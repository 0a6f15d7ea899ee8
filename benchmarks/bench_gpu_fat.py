"""VGG11 on CIFAR-10-shaped data: one FAT epoch against a plain epoch, and K chips trained as
one computation against K one by one; on the GPU when there is one, else the CPU; prints JSON.

    .venv/bin/python benchmarks/bench_gpu_fat.py              # cuda if present (50,000 images,
                                                              # K = 32), else cpu (256 images,
                                                              # K = 4 chips of 128)

The images are random tensors of CIFAR-10's shape (3x32x32, 10 classes; the time does not depend
on their values), held on the device, so the figures are of the training alone. Both parts use
params.yaml's `fat` optimizer and batch size and the project's own code:
- plain vs FAT: one epoch from the same weights and batch order, plain fine-tuning against a
  FatSession with a uniform fault map's masks (faulty PEs bypassed: the gradient and weight
  multiplies of every step); interleaved pairs, the median of the per-pair ratios (goal on a
  GPU: <= 1.05);
- K chips (K fault maps of one rate, one FAT seed): K FatSessions one after another, against the
  K chips as one computation, as the project's stacked model (BatchedFat, what execution.batch
  runs: grouped convolutions) and as torch.func.vmap over the stacked weights; chip-images per
  second and the ratio to one by one (goal on a GPU: >= 8 at K = 32), and the largest weight
  difference of the batched chips against their one-by-one training (float rounding only).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import REPO
from torch import nn

from reduce_ops.batched import BatchedFat
from reduce_ops.config import FatConfig, load_config
from reduce_ops.fault_aware import FatSession, batch_stream
from reduce_ops.hardware import (
    ArrayGeometry,
    build_masks,
    pruned_fraction,
    uniform_fault_map,
)
from reduce_ops.models import build_model
from reduce_ops.training import make_optimizer, train_steps

SHAPE, CLASSES = (3, 32, 32), 10
GOAL_FAT_OVER_PLAIN, GOAL_BATCHED_OVER_SEQUENTIAL, GOAL_K = 1.05, 8.0, 32


@dataclass
class Images:
    """A train split of random CIFAR-10-shaped images on the device (what FatSession reads)."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]


def images(n: int, device: torch.device) -> Images:
    g = torch.Generator().manual_seed(0)
    return Images({"train": torch.randn(n, *SHAPE, generator=g).to(device)},
                  {"train": torch.randint(0, CLASSES, (n,), generator=g).to(device)})


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def plain_epoch(model: nn.Module, data: Images, cfg: FatConfig, device: torch.device) -> None:
    """Fine-tuning without masks, set up as FatSession sets itself up (same batch order)."""
    n_per_epoch, stream = batch_stream(data, cfg)
    train_steps(model, make_optimizer(model, cfg), data.x["train"], data.y["train"], stream,
                n_per_epoch, device)


def fat_epoch(model: nn.Module, masks: dict, data: Images, cfg: FatConfig,
              device: torch.device) -> FatSession:
    session = FatSession(model, masks, data, cfg, device)
    session.advance(1.0)
    return session


def vmap_fat(baseline: nn.Module, masks: list[dict], data: Images, cfg: FatConfig,
             device: torch.device) -> BatchedFat:
    """One epoch of BatchedFat (the same stacked weights, batches, masks and optimizer step)
    with its forward pass through torch.func.vmap of the model over the stacked weights in
    place of the stacked computation (for models without buffers, as VGG11 here)."""
    from torch.func import functional_call, vmap

    run = BatchedFat(baseline, masks, data, cfg, device)
    forward = vmap(lambda p, x: functional_call(baseline, p, (x,)), in_dims=(0, None))
    run.net.forward = lambda x: forward({n.replace(":", "."): p for n, p in run.params.items()},
                                        x)
    run.advance(1.0)
    return run


def largest_difference(models: list[dict[str, torch.Tensor]], run: BatchedFat) -> float:
    """The largest weight difference of the batched chips from their one-by-one training."""
    return max(float((run.params[name.replace(".", ":")][i].detach() - w).abs().max())
               for i, weights in enumerate(models) for name, w in weights.items())


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    n_images = args.images or (50_000 if gpu else 256)
    k = args.k or (GOAL_K if gpu else 4)
    k_images = args.k_images or (12_800 if gpu else 128)
    cfg = load_config(REPO / "params.yaml").fat
    if args.batch_size:
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    torch.manual_seed(0)
    baseline = build_model("vgg11", SHAPE, CLASSES).to(device)
    layer_types = load_config(REPO / "params.yaml").hardware.layer_types
    geometry = ArrayGeometry(args.rows, args.cols)
    maps = [uniform_fault_map(geometry, args.rate, seed) for seed in range(k)]
    masks = [{n: m.to(device) for n, m in build_masks(baseline, f, layer_types).items()}
             for f in maps]

    # plain against FAT, one epoch each, interleaved pairs alternating their order
    data = images(n_images, device)
    times: dict[str, list[float]] = {"plain": [], "fat": []}
    for i in range(args.warmup + args.repeats):
        for kind in ("plain", "fat") if i % 2 == 0 else ("fat", "plain"):
            model = copy.deepcopy(baseline)
            if kind == "plain":
                t = timed(functools.partial(plain_epoch, model, data, cfg, device), device)
            else:
                t = timed(functools.partial(fat_epoch, model, masks[0], data, cfg, device),
                          device)
            if i >= args.warmup:
                times[kind].append(t)
    ratios = sorted(f / p for f, p in zip(times["fat"], times["plain"]))
    del data

    # K chips: one by one, the project's stacked model, vmap
    data = images(k_images, device)
    one_by_one: list[dict[str, torch.Tensor]] = []

    def sequential() -> None:
        one_by_one.clear()
        for m in masks:
            session = fat_epoch(copy.deepcopy(baseline), m, data, cfg, device)
            one_by_one.append({n: p.detach() for n, p in session.model.named_parameters()})

    batched: list[BatchedFat] = []

    def stacked() -> None:
        batched[:] = [BatchedFat(baseline, masks, data, cfg, device)]
        batched[0].advance(1.0)

    vmapped: list[BatchedFat] = []

    def with_vmap() -> None:
        vmapped[:] = [vmap_fat(baseline, masks, data, cfg, device)]

    kinds = {"sequential": sequential, "stacked": stacked}
    if not args.no_vmap:
        kinds["vmap"] = with_vmap
    k_times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(args.warmup + args.repeats):
        for kind, fn in kinds.items():
            t = timed(fn, device)
            if i >= args.warmup:
                k_times[kind].append(t)
    med = {kind: statistics.median(ts) for kind, ts in k_times.items()}
    chip_images = k * k_images
    out = {
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()}"
                                                                 " torch threads)",
        "model": "build_model('vgg11', (3, 32, 32), 10)",
        "optimizer": f"{cfg.optimizer} lr={cfg.lr} momentum={cfg.momentum} "
                     f"weight_decay={cfg.weight_decay}, batch {cfg.batch_size}",
        "array": str(geometry), "fault_rate": args.rate,
        "pruned_fraction": round(pruned_fraction(masks[0]), 4),
        "repeats": args.repeats,
        "epoch_images": n_images,
        "plain_epoch_s_median": round(statistics.median(times["plain"]), 4),
        "fat_epoch_s_median": round(statistics.median(times["fat"]), 4),
        "fat_over_plain_median": round(statistics.median(ratios), 4),
        "fat_over_plain_min_max": [round(ratios[0], 4), round(ratios[-1], 4)],
        "k": k, "k_epoch_images": k_images,
        "sequential_s_median": round(med["sequential"], 4),
        "sequential_chip_images_per_s": round(chip_images / med["sequential"], 1),
        "stacked_s_median": round(med["stacked"], 4),
        "stacked_chip_images_per_s": round(chip_images / med["stacked"], 1),
        "stacked_over_sequential": round(med["sequential"] / med["stacked"], 3),
        "stacked_largest_weight_difference": largest_difference(one_by_one, batched[0]),
    }
    if "vmap" in med:
        out |= {
            "vmap_s_median": round(med["vmap"], 4),
            "vmap_chip_images_per_s": round(chip_images / med["vmap"], 1),
            "vmap_over_sequential": round(med["sequential"] / med["vmap"], 3),
            "vmap_largest_weight_difference": largest_difference(one_by_one, vmapped[0]),
        }
    best = max(out["stacked_over_sequential"], out.get("vmap_over_sequential", 0.0))
    out["goals"] = {
        "fat_over_plain_at_most": GOAL_FAT_OVER_PLAIN,
        "batched_over_sequential_at_least": GOAL_BATCHED_OVER_SEQUENTIAL, "at_k": GOAL_K,
        "measured_where_they_apply": gpu and k == GOAL_K,
        "fat_over_plain_met": out["fat_over_plain_median"] <= GOAL_FAT_OVER_PLAIN,
        "batched_over_sequential_met": best >= GOAL_BATCHED_OVER_SEQUENTIAL,
    }
    out["torch"] = torch.__version__
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=0,
                        help="images in the plain / FAT epoch (0: 50,000 on a GPU, 256 on cpu)")
    parser.add_argument("--k", type=int, default=0, help="chips (0: 32 on a GPU, 4 on cpu)")
    parser.add_argument("--k-images", type=int, default=0,
                        help="images in each chip's epoch (0: 12,800 on a GPU, 128 on cpu)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.1, help="fault rate of every map")
    parser.add_argument("--batch-size", type=int, default=0, help="0: params.yaml fat.batch_size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--no-vmap", action="store_true", help="leave out the vmap variant")
    print(json.dumps(run(parser.parse_args()), indent=1))


if __name__ == "__main__":
    main()

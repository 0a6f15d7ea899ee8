"""Time one epoch of fault-aware training against plain fine-tuning; prints JSON figures.

Both runs start from the same weights, use the same optimizer settings (params.yaml `fat`) and
the same batch order; they are interleaved (plain, fat, plain, fat, ...) so that load on a shared
machine hits both alike, and the figure of merit is the median of the per-pair ratios fat/plain.
The masks are built once before the loop (their build time is reported apart).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, median_ms
from torch import nn

from reduce_ops.config import FatConfig, load_config
from reduce_ops.data import PreparedData, load_prepared, prepare
from reduce_ops.fault_aware import fault_aware_train
from reduce_ops.hardware import (
    ArrayGeometry,
    MaskedWeights,
    build_masks,
    pruned_fraction,
    uniform_fault_map,
)
from reduce_ops.models import build_model
from reduce_ops.training import batches, make_optimizer, steps_per_epoch, train_steps

GOAL_RATIO = 1.05


def load_data(source: str, tmp: Path) -> tuple[PreparedData, str]:
    """`auto`: the repository's prepared split if present, else digits; `digits`; or a folder."""
    cfg = load_config(REPO / "params.yaml")
    if source == "auto":
        prepared = cfg.path("prepared")
        if (prepared / "meta.json").is_file():
            data = load_prepared(prepared)
            return data, f"{data.meta['source']} ({prepared})"
        source = "digits"
    if source == "digits":
        data_cfg = dataclasses.replace(cfg.data, source="digits")
        prepare(data_cfg, tmp / "raw", tmp / "prepared")
        return load_prepared(tmp / "prepared"), "digits (prepared into a temp dir)"
    data = load_prepared(Path(source))
    return data, f"{data.meta['source']} ({source})"


def plain_epoch(model: nn.Module, data: PreparedData, epochs: float, cfg: FatConfig) -> None:
    """Fine-tuning without masks, set up exactly as fault_aware_train sets itself up."""
    n = len(data.y["train"])
    torch.manual_seed(cfg.seed)
    stream = batches(n, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    optimizer = make_optimizer(model, cfg)
    n_steps = int(round(epochs * steps_per_epoch(n, cfg.batch_size)))
    train_steps(model, optimizer, data.x["train"], data.y["train"], stream, n_steps)


def timed(fn, *args) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn(*args). With one torch thread, CPU time leaves out the
    time this process waited for a core, which dominates the noise on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def mask_ops_ms_per_step(model: nn.Module, masks: dict[str, torch.Tensor], reps: int = 50) -> float:
    """Milliseconds of the work FAT adds to one optimizer step, timed alone (low noise): the
    gradient multiply before the step and the weight multiply after it, as in training.py."""
    model = copy.deepcopy(model)
    masked = MaskedWeights(model, masks)
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    def steps() -> None:
        for _ in range(reps):
            masked.zero_grads()
            masked.apply()

    return median_ms(steps, 5, warmup=0) / reps


def masked_weights_zero(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    params = dict(model.named_parameters())
    return all(bool((params[name][~mask] == 0).all()) for name, mask in masks.items())


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(REPO / "params.yaml").fat
    if args.batch_size:
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        data, source = load_data(args.source, Path(tmp))
    torch.manual_seed(0)
    initial = build_model(args.model, data.input_shape, data.num_classes)

    geometry = ArrayGeometry(args.rows, args.cols)
    fault_map = uniform_fault_map(geometry, args.rate, args.fault_seed)
    build_ms = median_ms(lambda: build_masks(initial, fault_map), 5, warmup=0)
    masks = build_masks(initial, fault_map)

    mask_ops_ms = mask_ops_ms_per_step(initial, masks)

    # Pairs alternate their order (plain first, then fat first) so drift and warm caches favour
    # neither; fault_aware_train is timed whole (mask conversion, FAP, every per-step mask).
    wall: dict[str, list[float]] = {"plain": [], "fat": []}
    cpu: dict[str, list[float]] = {"plain": [], "fat": []}
    all_zero = True
    for i in range(args.warmup + args.repeats):
        for kind in ("plain", "fat") if i % 2 == 0 else ("fat", "plain"):
            model = copy.deepcopy(initial)
            if kind == "plain":
                t_wall, t_cpu = timed(plain_epoch, model, data, args.epochs, cfg)
            else:
                t_wall, t_cpu = timed(fault_aware_train, model, masks, data, args.epochs, cfg)
                all_zero &= masked_weights_zero(model, masks)
            if i >= args.warmup:
                wall[kind].append(t_wall)
                cpu[kind].append(t_cpu)
    plain_s, fat_s = wall["plain"], wall["fat"]

    ratios = sorted(f / p for f, p in zip(fat_s, plain_s))
    cpu_ratios = sorted(f / p for f, p in zip(cpu["fat"], cpu["plain"]))
    n_train = len(data.y["train"])
    n_steps = int(round(args.epochs * steps_per_epoch(n_train, cfg.batch_size)))
    mask_share = mask_ops_ms * n_steps / 1e3 / statistics.median(plain_s)
    return {
        "model": args.model,
        "source": source,
        "n_train": n_train,
        "batch_size": cfg.batch_size,
        "optimizer": f"{cfg.optimizer} lr={cfg.lr} momentum={cfg.momentum} "
                     f"weight_decay={cfg.weight_decay}",
        "epochs": args.epochs,
        "steps_per_epoch": steps_per_epoch(n_train, cfg.batch_size),
        "array": str(geometry),
        "fault_rate": args.rate,
        "pruned_fraction": round(pruned_fraction(masks), 4),
        "mask_build_ms_median": round(build_ms, 3),
        "repeats": args.repeats,
        "plain_s_median": round(statistics.median(plain_s), 4),
        "fat_s_median": round(statistics.median(fat_s), 4),
        "ratio_median": round(statistics.median(ratios), 4),
        "ratio_min": round(ratios[0], 4),
        "ratio_p90": round(ratios[min(len(ratios) - 1, int(0.9 * len(ratios)))], 4),
        "cpu_plain_s_median": round(statistics.median(cpu["plain"]), 4),
        "cpu_fat_s_median": round(statistics.median(cpu["fat"]), 4),
        "cpu_ratio_median": round(statistics.median(cpu_ratios), 4),
        "cpu_ratio_min_max": [round(cpu_ratios[0], 4), round(cpu_ratios[-1], 4)],
        "mask_ops_ms_per_step": round(mask_ops_ms, 4),
        "mask_ops_share_of_plain": round(mask_share, 4),  # 1 + this: the ratio without noise
        "goal_ratio": GOAL_RATIO,
        "meets_goal": statistics.median(ratios) <= GOAL_RATIO,
        "masked_weights_zero": all_zero,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet", help="build_model name (default lenet)")
    parser.add_argument("--source", default="auto",
                        help="auto (data/prepared if present, else digits), digits, or a "
                             "prepared folder")
    parser.add_argument("--epochs", type=float, default=1.0, help="retraining amount per run")
    parser.add_argument("--repeats", type=int, default=7, help="timed (plain, fat) pairs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pairs first")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.2, help="fault rate of the map")
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=0, help="0: params.yaml fat.batch_size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    print(json.dumps(run(parser.parse_args()), indent=2))


if __name__ == "__main__":
    main()

"""How much of the machine the default pipeline's training and evaluation use; prints JSON.

    .venv/bin/python benchmarks/bench_throughput.py            # one torch thread
    .venv/bin/python benchmarks/bench_throughput.py --threads 2

On the default model and the prepared split (digits when none is prepared), at `--threads`:
- the matmul roofline: fp32 GFLOP/s of a large square matmul (median of repeats);
- FAT training: images per second over one epoch of `fault_aware_train` at a uniform fault
  map of `--rate`, and GFLOP/s from the model's counted multiply-adds (forward + backward =
  3 x forward), as a share of the roofline;
- evaluation: images per second of the per-image evaluation every check uses;
- the same for `--batch` chips trained and evaluated as one computation (execution.batch,
  reduce_ops.batched): chip-images per second, and its share of the roofline;
- a resilience trial's evaluation share: a trial trains `max_epochs`, evaluates validation at
  every checkpoint (what its decisions read) and test once (its final model), so share =
  eval / (eval + train) at the measured rates (and what it was when test was evaluated at every
  checkpoint too);
- images trained and evaluated per stage for params.yaml (resilience, fat, compare), from the
  grid, the fleet size and the cap (fat's from results/fat/summary.json when present).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_fat_overhead import load_data
from common import REPO, median_ms

from reduce_ops.batched import BatchedFat
from reduce_ops.config import load_config
from reduce_ops.execution import keep_freed_memory
from reduce_ops.fault_aware import fault_aware_train
from reduce_ops.hardware import ArrayGeometry, build_masks, uniform_fault_map
from reduce_ops.models import build_model
from reduce_ops.resilience import checkpoint_amounts
from reduce_ops.stacked import forward_flops
from reduce_ops.training import evaluate_images


def matmul_gflops(n: int = 1024, repeats: int = 21) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / (median_ms(lambda: a @ b, repeats) / 1e3) / 1e9


def stage_images(cfg, n: dict[str, int]) -> dict[str, dict[str, float]]:
    """Images trained and evaluated per stage for these params (the grid, fleet and cap)."""
    r = cfg.resilience
    trials = len(r.fault_rates) * r.repetitions
    checks = len(checkpoint_amounts(r))
    out = {"resilience": {"trained": trials * r.max_epochs * n["train"],
                          "evaluated": trials * (checks * n["val"] + n["test"]),
                          "note": "the grid only (trials that go on past it add more)"}}
    summary = REPO / cfg.paths.results / "fat" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        out["fat"] = {"trained": s["trained_epochs"] * n["train"],
                      "evaluated": None, "note": "from results/fat/summary.json"}
    chips = cfg.faultmaps.n_chips
    cap = cfg.plan.budget_cap
    points = round(cap / r.checkpoint_every) + 1
    out["compare"] = {"trained": chips * cap * n["train"],
                      "evaluated": chips * points * (n["val"] + n["test"]),
                      "note": "every chip once to the cap, both splits every checkpoint"}
    return out


def run(args: argparse.Namespace) -> dict:
    keep_freed_memory()                      # as every reduce-ops process and worker does
    torch.set_num_threads(args.threads)
    cfg = load_config(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        data, source = load_data("auto", Path(tmp))
    n = {s: len(data.y[s]) for s in ("train", "val", "test")}
    torch.manual_seed(0)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes)
    flops = forward_flops(model, torch.zeros(1, *data.input_shape))
    masks = build_masks(model, uniform_fault_map(ArrayGeometry(cfg.hardware.rows,
                                                               cfg.hardware.cols),
                                                 args.rate, 0))
    roofline = matmul_gflops()

    train_s = []
    for _ in range(args.repeats):
        m = build_model(cfg.model.name, data.input_shape, data.num_classes)
        m.load_state_dict(model.state_dict())
        t = time.perf_counter()
        fault_aware_train(m, masks, data, 1.0, cfg.fat)
        train_s.append(time.perf_counter() - t)
    eval_s = median_ms(lambda: [evaluate_images(model, data.x[s], data.y[s])
                                for s in ("val", "test")], args.repeats) / 1e3
    geometry = ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols)
    fleet = [uniform_fault_map(geometry, args.rate, i) for i in range(args.batch)]
    paired = {s: torch.ones(n[s], dtype=torch.bool) for s in ("val", "test")}
    batched_s = []
    for _ in range(args.repeats):
        run = BatchedFat.from_baseline(model, fleet, cfg.hardware.layer_types, data, cfg.fat,
                                       paired=paired)
        t = time.perf_counter()
        run.advance(1.0)
        batched_s.append(time.perf_counter() - t)
    batched_eval_s = median_ms(lambda: run.measure(("val", "test")), args.repeats) / 1e3
    train_ips = n["train"] / statistics.median(train_s)
    eval_ips = (n["val"] + n["test"]) / eval_s
    train_gflops = train_ips * 3 * flops / 1e9
    batched_ips = args.batch * n["train"] / statistics.median(batched_s)
    batched_eval_ips = args.batch * (n["val"] + n["test"]) / batched_eval_s
    batched_gflops = batched_ips * 3 * flops / 1e9
    batched_trial_train = cfg.resilience.max_epochs * n["train"] / batched_ips
    checks = len(checkpoint_amounts(cfg.resilience))      # a trial's grid, 0 included
    batched_trial_eval = (checks * n["val"] + n["test"]) / batched_eval_ips
    trial_train = cfg.resilience.max_epochs * n["train"] / train_ips
    trial_eval = (checks * n["val"] + n["test"]) / eval_ips           # what a trial does now
    trial_eval_both = checks * (n["val"] + n["test"]) / eval_ips      # both splits every check
    return {
        "source": source, "model": cfg.model.name, "threads": args.threads,
        "cores": os.cpu_count(),
        "matmul_roofline_gflops": round(roofline, 1),
        "forward_mflop_per_image": round(flops / 1e6, 3),
        "fat_train_images_per_s": round(train_ips),
        "fat_train_images_per_s_per_thread": round(train_ips / args.threads),
        "fat_train_gflops": round(train_gflops, 1),
        "fat_train_share_of_roofline": round(train_gflops / roofline, 3),
        "eval_images_per_s": round(eval_ips),
        "eval_gflops": round(eval_ips * flops / 1e9, 1),
        "resilience_trial_eval_share": round(trial_eval / (trial_eval + trial_train), 3),
        "resilience_trial_eval_share_both_splits_every_check": round(
            trial_eval_both / (trial_eval_both + trial_train), 3),
        "batch": args.batch,
        "batched_fat_train_chip_images_per_s": round(batched_ips),
        "batched_fat_train_gflops": round(batched_gflops, 1),
        "batched_fat_train_share_of_roofline": round(batched_gflops / roofline, 3),
        "batched_over_one_by_one_train": round(batched_ips / train_ips, 2),
        "batched_eval_chip_images_per_s": round(batched_eval_ips),
        "batched_over_one_by_one_eval": round(batched_eval_ips / eval_ips, 2),
        "batched_resilience_trial_eval_share": round(
            batched_trial_eval / (batched_trial_eval + batched_trial_train), 3),
        "images_per_stage": stage_images(cfg, n),
        "repeats": args.repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.3, help="fault rate of the FAT map")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="chips trained as one computation")
    print(json.dumps(run(parser.parse_args()), indent=1))


if __name__ == "__main__":
    main()

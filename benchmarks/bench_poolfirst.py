"""A plain model with and without its activations run after the max-pools that read them
(reduce_ops.poolfirst): evaluation and training speed, one torch thread; prints JSON.

    .venv/bin/python benchmarks/bench_poolfirst.py --repeats 9

On the default model (params.yaml, or --model) and the prepared split (digits when none is
prepared), timed interleaved (each round runs every case once): evaluating the validation split
as float and as int8 (`quantized_accuracy`'s path), and an epoch of the baseline's own
training loop (`train_steps`, params' train.* optimizer and batch size) from the same weights
and batches. It also says whether both give the same answers and weights to the bit.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_fat_overhead import load_data
from common import REPO, interleaved_ms
from torch.nn.utils import parametrize

from reduce_ops.config import load_config
from reduce_ops.models import build_model
from reduce_ops.poolfirst import pool_first
from reduce_ops.quant import QuantizedWeights
from reduce_ops.training import (
    batches,
    evaluate_images,
    make_optimizer,
    steps_per_epoch,
    train_steps,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default=None, help="zoo name (default: params' model.name)")
    parser.add_argument("--data", default="auto", help="auto | digits | a prepared folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(REPO / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        data, source = load_data(args.data, Path(tmp))
    name = args.model or cfg.model.name
    torch.manual_seed(0)
    model = build_model(name, data.input_shape, data.num_classes)
    fast = pool_first(model)
    if fast is model:
        raise SystemExit(f"{name}: no activation that only a max-pool reads; nothing to compare")
    x, y = data.x["val"], data.y["val"]
    layers = list(cfg.hardware.layer_types)
    n = len(data.y["train"])
    n_steps = steps_per_epoch(n, cfg.train.batch_size)

    def evaluation(m):
        return lambda: evaluate_images(m, x, y)[0]

    def int8(m):
        def run():
            with QuantizedWeights(model, layers), parametrize.cached():
                return evaluate_images(m, x, y)[0]
        return run

    trained = {}

    def training(moved: bool) -> float:
        """ms of one epoch of train_steps from the model's weights (set up untimed)."""
        copy_ = copy.deepcopy(model)
        forward = pool_first(copy_) if moved else copy_
        optimizer = make_optimizer(copy_, cfg.train)
        stream = batches(n, cfg.train.batch_size, torch.Generator().manual_seed(0))
        start = time.perf_counter()
        train_steps(forward, optimizer, data.x["train"], data.y["train"], stream, n_steps)
        trained[moved] = copy_
        return (time.perf_counter() - start) * 1e3

    cases = {"eval": evaluation(model), "eval_pool_first": evaluation(fast),
             "int8_eval": int8(model), "int8_eval_pool_first": int8(fast)}
    times = interleaved_ms(cases, args.repeats)
    for _ in range(args.repeats):              # interleaved too
        for moved, key in ((False, "train"), (True, "train_pool_first")):
            times.setdefault(key, []).append(training(moved))
    med = {k: statistics.median(v) for k, v in times.items()}
    same_answers = (torch.equal(cases["eval"](), cases["eval_pool_first"]())
                    and torch.equal(cases["int8_eval"](), cases["int8_eval_pool_first"]()))
    a, b = trained[False].state_dict(), trained[True].state_dict()
    print(json.dumps({
        "model": name, "data": source, "threads": 1, "repeats": args.repeats,
        "val_images": len(y), "train_steps": n_steps, "batch_size": cfg.train.batch_size,
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "speedup": {k: round(med[k] / med[f"{k}_pool_first"], 3)
                    for k in ("eval", "int8_eval", "train")},
        "same_answers": same_answers,
        "same_weights_after_training": all(torch.equal(a[k], b[k]) for k in a)}, indent=1))


if __name__ == "__main__":
    main()

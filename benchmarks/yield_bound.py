"""How far any decision that reads validation data only can get, and how many images it needs.

    .venv/bin/python benchmarks/yield_bound.py --seeds 0 1 2 3 4 --jobs 2 --out /tmp/bound
    .venv/bin/python benchmarks/yield_bound.py --seeds 0 1 2 3 4 --out /tmp/bound \\
        --images 1000 2000 4000 --draws 200          # analysis only: the correctness is kept

Per training seed, in a throw-away copy of the project: `prepare`, `faultmaps` and `pretrain`
(train.seed set), then every fleet chip trained to the budget cap as `fat` trains it, keeping
the baseline's and every chip's per-image correctness on the validation and test images.

The bound: a chip's model at the cap, decided once on validation with the shipping threshold
chosen in hindsight (the best any rule that ranks chips by what validation shows could pick, at
the most training a chip can get). For new validation and test splits of n images each, drawn
with replacement from the 2,000 measured images (the measured noise: per-image correctness of
the baseline and of every chip, with their correlations), it reports per seed the best yield
(shipped and meeting / recoverable) at escapes <= --escapes of shipped, and the share of draws
in which that best yield reaches --yield, for a `drop` constraint (judged against the baseline
on each split) and an `absolute` level; over the seeds, the chance that it reaches --yield on
every one of them and the number of seeds expected to miss.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import REPO, run_stages, sqlite_store, stage_env, throwaway_copy


def measure(seed: int, sets: list[str], out: Path) -> None:
    """The seed's baseline and every chip at the cap: per-image correctness -> out (npz)."""
    with throwaway_copy(f"bound{seed}-", ["data/fault_maps"]) as root:
        env = stage_env(root, sqlite_store(root), threads=1)
        run_stages(root, ["prepare", "faultmaps", "pretrain"], [f"train.seed={seed}", *sets],
                   env, f"seed {seed}")
        chips_at_cap(root, [f"train.seed={seed}", *sets], out)


def chips_at_cap(root: Path, sets: list[str], out: Path) -> None:
    import torch

    from reduce_ops.config import load_config
    from reduce_ops.data import load_prepared
    from reduce_ops.fault_aware import FatSession
    from reduce_ops.hardware import ArrayGeometry, load_fleet
    from reduce_ops.models import load_checkpoint
    from reduce_ops.training import evaluate_images

    torch.set_num_threads(1)
    cfg = load_config(root / "params.yaml", sets)
    data = load_prepared(cfg.path("prepared"))
    baseline, _ = load_checkpoint(cfg.path("baseline"))

    def correct(model: torch.nn.Module) -> np.ndarray:
        return np.concatenate([evaluate_images(model, data.x[s], data.y[s])[0].numpy()
                               for s in ("val", "test")])

    chips = []
    for fmap in load_fleet(cfg.path("fleet"), ArrayGeometry(cfg.hardware.rows, cfg.hardware.cols)):
        session = FatSession.from_baseline(baseline, fmap, cfg.hardware.layer_types, data,
                                           cfg.fat)
        session.advance(cfg.plan.budget_cap)
        chips.append(correct(session.model))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, baseline=correct(baseline), chips=np.stack(chips),
                        n_val=len(data.y["val"]))


def best_yield(decide: np.ndarray, recoverable: np.ndarray, escapes: float) -> float:
    """The best yield of shipping the chips above a threshold on `decide` (chosen in hindsight)
    with at most `escapes` of the shipped chips not recoverable."""
    order = np.argsort(-decide, kind="stable")
    rec = recoverable[order]
    good, bad = np.cumsum(rec), np.cumsum(~rec)
    ok = bad <= escapes * np.arange(1, rec.size + 1)
    return float(good[ok].max() / rec.sum()) if ok.any() and rec.any() else float("nan")


def bound(path: Path, n: int, draws: int, kind: str, value: float, escapes: float,
          rng: np.random.Generator) -> np.ndarray:
    """Best yields over `draws` resampled pairs of n-image splits (see the module's doc)."""
    z = np.load(path)
    base, chips = z["baseline"].astype(bool), z["chips"].astype(bool)
    out = np.empty(draws)
    for b in range(draws):
        v = rng.integers(0, base.size, n)
        t = rng.integers(0, base.size, n)
        chip_v, chip_t = chips[:, v].mean(1), chips[:, t].mean(1)
        if kind == "drop":
            level_t = base[t].mean() - value
            decide = chip_v - base[v].mean()
        else:
            level_t, decide = value, chip_v
        out[b] = best_yield(decide, chip_t >= level_t - 1e-12, escapes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--drop", type=float, default=0.01)
    parser.add_argument("--absolute", type=float, default=None,
                        help="absolute level (default: params.yaml's constraint when absolute)")
    parser.add_argument("--escapes", type=float, default=0.03)
    parser.add_argument("--yield", dest="goal", type=float, default=0.85)
    args = parser.parse_args()
    todo = [s for s in args.seeds if not (args.out / f"seed{s}.npz").is_file()]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda s: measure(s, args.sets, args.out / f"seed{s}.npz"), todo))
    if args.absolute is None:
        from reduce_ops.config import load_config

        c = load_config(REPO / "params.yaml", args.sets).constraint
        args.absolute = c.value if c.kind == "absolute" else 0.95
    rng = np.random.default_rng(0)
    for kind, value in (("drop", args.drop), ("absolute", args.absolute)):
        for n in args.images:
            reach = []
            for seed in args.seeds:
                y = bound(args.out / f"seed{seed}.npz", n, args.draws, kind, value,
                          args.escapes, rng)
                reach.append(float(np.mean(y >= args.goal)))
                print(json.dumps({"constraint": kind, "value": value, "images": n, "seed": seed,
                                  "best_yield_mean": round(float(np.nanmean(y)), 4),
                                  "best_yield_p10": round(float(np.nanpercentile(y, 10)), 4),
                                  "reaches_goal": round(reach[-1], 3)}),
                      flush=True)
            # over the seeds: the chance that the goal is reached on every one of them (the
            # seeds' splits drawn independently) and how many are expected to miss it
            print(json.dumps({"constraint": kind, "value": value, "images": n,
                              "seeds": len(reach),
                              "reaches_goal_on_every_seed": round(float(np.prod(reach)), 3),
                              "seeds_expected_to_miss": round(float(np.sum(1 - np.array(reach))),
                                                              2)}), flush=True)


if __name__ == "__main__":
    main()

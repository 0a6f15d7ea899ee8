"""The `reduce-ops` command: one thin function per stage wiring config, I/O and tracking."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from reduce_ops.config import Config, flatten, load_config, split_overrides
from reduce_ops.errors import ReduceOpsError


def _progress(**kwargs):  # noqa: ANN202 - a tqdm bar on stderr, quiet when not a terminal+CI
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kwargs)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- stages

def cmd_prepare(cfg: Config, args: argparse.Namespace) -> None:
    """Read the dataset source, write the seeded stratified split to paths.prepared."""
    from reduce_ops.data import prepare

    out = cfg.path("prepared")
    meta = prepare(cfg.data, cfg.path("raw"), out)
    sizes = ", ".join(f"{k} {v}" for k, v in meta["split_sizes"].items())
    print(f"prepared {meta['source']}: {sizes}; input {tuple(meta['input_shape'])}, "
          f"{meta['num_classes']} classes, hash {meta['dataset_hash'][:12]} -> {out}")


def cmd_pretrain(cfg: Config, args: argparse.Namespace) -> None:
    """Train the baseline until its validation accuracy plateaus; save it and log one run."""
    import torch

    from reduce_ops.data import load_prepared
    from reduce_ops.models import build_model, save_checkpoint
    from reduce_ops.tracking import stage_run
    from reduce_ops.training import evaluate, pretrain, resolve_device

    data = load_prepared(cfg.path("prepared"))
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    with stage_run(cfg.root, "pretrain", cfg.tracking.experiment) as run:
        run.log_params(flatten({k: cfg.to_dict()[k] for k in ("data", "model", "train")}))
        run.log_params({"dataset_hash": data.dataset_hash, "n_parameters": n_params,
                        "device": str(device)})
        run.set_tags({"reduce_ops.dataset_hash": data.dataset_hash})
        with _progress(total=cfg.train.max_epochs, desc=f"pretrain {cfg.model.name}",
                       unit="epoch") as bar:
            def on_epoch(rec) -> None:  # noqa: ANN001
                run.log_metrics({"train_loss": rec.train_loss, "val_accuracy": rec.val_accuracy,
                                 "val_loss": rec.val_loss, "epoch_seconds": rec.seconds},
                                step=rec.epoch)
                bar.update(1)
                bar.set_postfix(val_acc=f"{rec.val_accuracy:.4f}", loss=f"{rec.train_loss:.3f}")

            result = pretrain(model, data, cfg.train, device, on_epoch)
        test_acc, test_loss = evaluate(model, data.x["test"], data.y["test"], device=device)
        seconds = time.perf_counter() - t0
        metrics = {"test_accuracy": test_acc, "test_loss": test_loss,
                   "best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
                   "epochs_trained": len(result.history), "train_seconds": seconds}
        run.log_metrics(metrics)
        arch = {"name": cfg.model.name, "input_shape": list(data.input_shape),
                "num_classes": data.num_classes}
        info = {"dataset_hash": data.dataset_hash, "test_accuracy": test_acc,
                "best_epoch": result.best_epoch, "run_id": run.run_id}
        baseline = cfg.path("baseline")
        save_checkpoint(model, arch, info, baseline)
        metrics_path = cfg.path("results") / "pretrain" / "metrics.json"
        write_json_atomic(metrics_path, {**metrics, "dataset_hash": data.dataset_hash,
                                         "model": cfg.model.name})
        run.log_artifact(metrics_path)
    print(f"baseline {cfg.model.name}: test accuracy {test_acc:.4f} after {len(result.history)} "
          f"epochs (best epoch {result.best_epoch}) in {seconds:.1f} s -> {baseline}; "
          f"MLflow run {run.run_id}")


STAGES: dict[str, tuple[Callable[[Config, argparse.Namespace], None], str]] = {
    "prepare": (cmd_prepare, "read the dataset, write the seeded stratified split"),
    "pretrain": (cmd_pretrain, "train the baseline model to convergence"),
}


# --------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", metavar="FILE",
                        help="parameters file (default: params.yaml)")
    common.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set train.max_epochs=3 (repeatable)")
    common.add_argument("--overrides", default="", metavar="'K=V K=V'",
                        help="several overrides in one string (used by MLproject entry points)")
    parser = argparse.ArgumentParser(prog="reduce-ops", description=__doc__)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (_, help_text) in STAGES.items():
        sub.add_parser(name, parents=[common], help=help_text, description=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; bad input ends with one line on stderr and exit code 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.params, [*split_overrides(args.overrides), *args.sets])
        STAGES[args.stage][0](cfg, args)
    except ReduceOpsError as exc:
        print(f"reduce-ops {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"reduce-ops {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pipeline's stages, one module each with a `run(cfg, ...)` that a test can call.

Stage modules wire config, files and tracking to the library modules; the `reduce-ops` command
only parses arguments and dispatches here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# Every stage, in pipeline order, with the one line `reduce-ops --help` shows for it.
STAGES: dict[str, str] = {
    "source": "record what the model and data sources are now (for DVC: a new version re-runs "
              "what follows)",
    "prepare": "read the dataset, write the seeded stratified split",
    "faultmaps": "generate the fleet's fault maps, or `faultmaps import DIR`",
    "pretrain": "train the baseline model to convergence (or measure the one model.source "
                "gives)",
    "resilience": "measure accuracy after k epochs of FAT at each fault rate",
    "plan": "plan each chip's retraining from the logged resilience",
    "group": "eFAT: fuse chips' fault maps where one retraining can serve several",
    "fat": "retrain every chip as planned, register one model per chip",
    "compare": "fixed-epoch policies vs Reduce on the fleet (Fig. 3)",
    "variants": "train the baseline variants (activation-sparse, SAM, SAQ) beside the baseline",
    "robustness": "accuracy of the int8 baseline and its variants under bit faults vs BER",
    "main": "the whole pipeline, one MLflow run with a child per step",
    "fetch": "show a chip's champion model, `fetch CHIP_ID --out DIR` downloads it",
    "ui": "the MLflow UI on this project's runs (prints the address of its training runs)",
    "server": "a team tracking server: PostgreSQL backend store + MLflow server, until Ctrl-C",
}
PIPELINE = ("prepare", "faultmaps", "pretrain", "resilience", "plan", "group", "fat", "compare",
            "variants", "robustness")

# stages whose units (trials, chips, variants) may run in a local pool of worker processes
POOLED = ("resilience", "fat", "compare", "variants", "robustness", "main")

# stages that read or write the tracking store, and whether they may create it
TRACKED = {"pretrain": True, "resilience": True, "plan": True, "group": True, "fat": True,
           "compare": True, "variants": True, "robustness": True, "main": True, "ui": True,
           "fetch": False}


def check_tracking(cfg: Any, stage: str) -> None:
    """Before a stage does any work: one line when its tracking store cannot be used (a server
    away fails within seconds, not after minutes of retries). A new SQLite store is made on
    first use, whole (tracking.store.client_for)."""
    import os

    from reduce_ops.tracking.store import check_store, open_existing, tracking_uri

    if stage in TRACKED:
        uri = tracking_uri(cfg.root)
        check_store(uri, bool(os.environ.get("MLFLOW_TRACKING_URI")), create=TRACKED[stage])
        open_existing(uri)


def runner(stage: str) -> Callable[..., Any]:
    """The stage's `run` function (its module is imported only when it runs)."""
    return importlib.import_module(f"reduce_ops.stages.{stage}").run

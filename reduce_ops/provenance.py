"""Provenance: which baseline, dataset and resilience run a result comes from, and whether the
current files are the ones it was made for."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reduce_ops import names
from reduce_ops.config import Config, flatten
from reduce_ops.errors import ConfigError, DataError, ReduceOpsError, TrackingError
from reduce_ops.tracking.runs import DatasetRef, RunRecord, get_run
from reduce_ops.tracking.store import param_text, tracking_uri


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Identity:
    """The baseline and dataset a result was made for (None: not recorded)."""

    baseline_hash: str | None
    dataset_hash: str

    def require_match(self, current: Identity, what: str, remedy: str) -> None:
        """One clear line when `what` (made for self) does not fit the current files."""
        differs = [name for name, mine, now in (("baseline", self.baseline_hash,
                                                 current.baseline_hash),
                                                ("dataset", self.dataset_hash,
                                                 current.dataset_hash))
                   if mine is not None and mine != now]
        if differs:
            raise ReduceOpsError(f"{what} was made for another {' and '.join(differs)}; {remedy}")


def dataset_meta(cfg: Config) -> dict:
    """meta.json of the prepared dataset, or one line saying to run `prepare`."""
    path = cfg.path("prepared") / names.PREPARED_META_FILE
    if not path.is_file():
        raise DataError(f"{path}: no prepared dataset; run `reduce-ops prepare` first")
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in ("dataset_hash", "source", "split_sizes", "input_shape",
                               "num_classes") if k not in meta]
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: unreadable ({type(exc).__name__}); run `reduce-ops prepare` "
                        f"again") from None
    if missing:
        raise DataError(f"{path}: lacks {', '.join(missing)}; run `reduce-ops prepare` again")
    return meta


def current_identity(cfg: Config) -> Identity:
    """sha256 of the current baseline file and hash of the current prepared dataset."""
    baseline = cfg.path("baseline")
    if not baseline.is_file():
        raise DataError(f"{baseline}: no baseline model; run `reduce-ops pretrain` first")
    return Identity(file_sha256(baseline), dataset_meta(cfg)["dataset_hash"])


def dataset_ref(cfg: Config) -> DatasetRef:
    """The prepared dataset as an MLflow dataset input (name, digest, source, profile)."""
    meta = dataset_meta(cfg)
    return DatasetRef(meta["source"], meta["dataset_hash"],
                               str(cfg.path("prepared").resolve()),
                               {"split_sizes": meta["split_sizes"],
                                "input_shape": meta["input_shape"],
                                "num_classes": meta["num_classes"]})


def identity_tags(identity: Identity) -> dict[str, str]:
    """The run tags that say which baseline and dataset a run was made for."""
    tags = {names.TAG_DATASET_HASH: identity.dataset_hash}
    if identity.baseline_hash is not None:
        tags[names.TAG_BASELINE_HASH] = identity.baseline_hash
    return tags


def measured_params(cfg: Config) -> dict[str, Any]:
    """The parameters that decide what resilience trials measure: logged on the resilience run
    and checked by every stage that reads its trials."""
    return {**flatten({k: cfg.to_dict()[k] for k in ("resilience", "fat", "hardware",
                                                       "constraint")}),
            "plan.budget_cap": cfg.plan.budget_cap, "verify.margin": cfg.verify.margin,
            "verify.escape_rate": cfg.verify.escape_rate, "verify.pool": cfg.verify.pool}


def resilience_run(cfg: Config, identity: Identity) -> RunRecord:
    """The resilience run a plan reads: plan.resilience_run, or the run the resilience stage
    recorded in its summary.json (the trials DVC tracks), checked against the current baseline,
    dataset and parameters."""
    uri = tracking_uri(cfg.root)
    if cfg.plan.resilience_run:
        run_id, where = cfg.plan.resilience_run, "plan.resilience_run"
    else:
        summary = cfg.path("results") / "resilience" / "summary.json"
        if not summary.is_file():
            raise DataError(f"{summary}: no resilience results; run `reduce-ops resilience` "
                            f"first (or set plan.resilience_run)")
        try:
            run_id, where = str(json.loads(summary.read_text())["run_id"]), str(summary)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{summary}: unreadable ({type(exc).__name__}); run `reduce-ops "
                            f"resilience` again (or set plan.resilience_run)") from None
    try:
        run = get_run(uri, run_id)
    except TrackingError:
        raise TrackingError(f"{where}: resilience run {run_id!r} is not in {uri}; run "
                            f"`reduce-ops resilience` (or set plan.resilience_run)") from None
    if run.deleted:
        raise TrackingError(f"{where}: resilience run {run_id} was deleted in MLflow; run "
                            f"`reduce-ops resilience` again (or restore the run)")
    stage = run.tags.get(names.TAG_STAGE)
    if stage != "resilience":
        what = f"a {stage} run" if stage else "not a reduce-ops run"
        raise ConfigError(f"{where}: MLflow run {run_id} is {what}, not a resilience run")
    if run.status != "FINISHED":
        raise TrackingError(f"{where}: resilience run {run_id} is {run.status}, not finished; "
                            f"run `reduce-ops resilience` again")
    remedy = "run `reduce-ops resilience` again"
    Identity(run.tags.get(names.TAG_BASELINE_HASH), run.tags.get(names.TAG_DATASET_HASH, "")
             ).require_match(identity, f"resilience run {run_id} ({where})", remedy)
    differs = [f"{key}={run.params.get(key, '(not logged)')} (now {param_text(value)})"
               for key, value in measured_params(cfg).items()
               if run.params.get(key) != param_text(value)]
    if differs:
        raise ReduceOpsError(f"resilience run {run_id} ({where}) was measured with "
                             f"{', '.join(differs)}; {remedy}")
    return run


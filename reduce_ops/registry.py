"""A chip's model in the registry: the champion of `<prefix>-<chip_id>`, why there is none,
fetching it by chip id from any folder."""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from reduce_ops import names
from reduce_ops.errors import ReduceOpsError, TrackingError
from reduce_ops.names import CHAMPION, CHIP_MODEL_FILE, REJECTED, registered_name
from reduce_ops.tracking.registry import (
    ModelVersionInfo,
    download_model_version,
    download_run_artifact,
    find_model_versions,
    model_version_by_alias,
    registered_model_tags,
    registered_model_tags_of,
)
from reduce_ops.tracking.runs import find_runs
from reduce_ops.tracking.store import check_store


def _model_name(uri: str, chip_id: str, prefix: str | None) -> str | None:
    """The registered model of a chip: <prefix>-<chip_id>, or (no prefix given) the one model
    tagged with the chip id; None when there is none."""
    if prefix is not None:
        return registered_name(prefix, chip_id)
    found = [n for n, c in registered_model_tags(uri, names.VTAG_CHIP).items()
             if c == chip_id]
    if len(found) > 1:
        raise TrackingError(f"chip {chip_id!r}: several registered models in {uri} "
                            f"({', '.join(sorted(found))}); give the registry prefix")
    return found[0] if found else None


def champion(uri: str, chip_id: str, prefix: str | None = None) -> ModelVersionInfo:
    """The chip's champion version, or one TrackingError line saying why there is none (no
    version met the constraint, the plan rejected the chip, or an unknown id: close matches)."""
    problem = names.safe_name_problem(chip_id)
    if problem:                      # it goes into registry searches: a safe name or nothing
        raise TrackingError(f"chip id: {problem}")
    name = _model_name(uri, chip_id, prefix)
    if name is not None:
        found = model_version_by_alias(uri, name, CHAMPION)
        if found is not None:
            return found
        tags = registered_model_tags_of(uri, name)
        if tags.get(names.MTAG_STATUS) == names.RETIRED:
            raise TrackingError(f"chip {chip_id!r} has no champion: it is retired "
                                f"({tags.get(names.MTAG_REASON) or 'not in the fleet'})")
        if tags.get(names.MTAG_STATUS) == REJECTED:
            raise TrackingError(f"chip {chip_id!r} has no champion: the current plan rejected "
                                f"it ({tags.get(names.MTAG_REASON) or 'no reason recorded'})")
        versions = find_model_versions(uri, name)
        if versions:
            raise TrackingError(f"chip {chip_id!r}: {len(versions)} version(s) of {name!r}, "
                                f"none verified (no {CHAMPION!r} alias) in {uri}")
    rejected = find_runs(uri, {names.TAG_CHIP: chip_id, names.TAG_REJECTED: "true"})
    if rejected:
        reason = rejected[0].params.get("reason", "infeasible")
        raise TrackingError(f"chip {chip_id!r} has no model: the plan found it infeasible "
                            f"({reason})")
    chips = registered_model_tags(uri, names.VTAG_CHIP)
    known = sorted(c for n, c in chips.items() if prefix is None or n.startswith(f"{prefix}-"))
    close = difflib.get_close_matches(chip_id, known, n=3, cutoff=0.6)
    if close:
        hint = f"; close matches: {', '.join(close)}"
    elif known:
        hint = f"; {len(known)} chips registered, e.g. {', '.join(known[:3])}"
    else:
        hint = "; no chip is registered yet: run `reduce-ops fat`"
    what = f"no registered model {name!r}" if name else "no registered model for it"
    raise TrackingError(f"unknown chip id {chip_id!r}: {what} in {uri}{hint}")


def load_chip_model(chip_id: str, tracking_uri: str | None = None,
                    prefix: str | None = None) -> nn.Module:
    """The chip's champion as a trainable nn.Module in eval mode (built from chip_model.pt).

    Works from any folder: the tracking URI is `tracking_uri` or MLFLOW_TRACKING_URI, and the
    chip's registered model is found by its chip_id tag (give `prefix` when several registry
    prefixes share one server). `mlflow.pytorch.load_model("models:/<prefix>-<chip_id>@champion")`
    gives the same model as a pt2 GraphModule (inference only).
    """
    from reduce_ops.models import load_checkpoint

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError("load_chip_model: give tracking_uri= or set MLFLOW_TRACKING_URI "
                            "(e.g. sqlite:////path/to/project/mlflow.db or http://host:5000)")
    check_store(uri, from_env=tracking_uri is None, create=False)   # seconds, not minutes
    version = champion(uri, chip_id, prefix)
    with tempfile.TemporaryDirectory() as tmp:
        path = download_run_artifact(uri, version.run_id, CHIP_MODEL_FILE, Path(tmp))
        model, _ = load_checkpoint(path, tracking_uri=uri)   # a user's MLflow model: here
    return model


def download_champion(uri: str, version: ModelVersionInfo, out: Path) -> Path:
    """The champion's MLflow model folder (out/model) and chip_model.pt (out/) downloaded. What
    is there already is replaced only when an earlier fetch put it there (out/model carries
    the marker): a user's own folder or file is never overwritten."""
    from reduce_ops import atomic

    model_dst, ckpt_dst = out / "model", out / CHIP_MODEL_FILE
    if out.exists() and not out.is_dir():
        raise ReduceOpsError(f"{out}: exists and is not a folder; give --out a folder")
    atomic.check_replaceable(model_dst, "fetch")
    if ((ckpt_dst.exists() or ckpt_dst.is_symlink())
            and atomic.owner_of(model_dst) != "fetch"):
        raise ReduceOpsError(f"{ckpt_dst}: exists and was not fetched by reduce-ops; it would "
                             f"be overwritten: move it away or give --out another folder")
    if ckpt_dst.is_dir():
        raise ReduceOpsError(f"{ckpt_dst}: is a folder; move it away or give --out another "
                             f"folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReduceOpsError(f"{out}: cannot create the folder ({exc.strerror})") from None
    atomic.sweep(model_dst, ("fetch",))         # downloads of fetches that were killed
    tmp = atomic.temp_sibling(model_dst, "fetch")  # same disk: the moves below are renames
    tmp.mkdir()
    try:
        model_dir, ckpt = download_model_version(uri, version, CHIP_MODEL_FILE, tmp)
        atomic.mark(model_dir, "fetch")
        atomic.replace_dir(model_dir, model_dst)
        os.replace(ckpt, ckpt_dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

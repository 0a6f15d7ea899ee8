"""A user's trained model in MLflow (model.source: mlflow): its URI resolved to one pinned
version, its flavour and format checked, loaded as a trainable nn.Module; and a stage run's own
model logged (the baseline that pretrain serves).

What loads: the `pytorch` flavour saved in the pickle format (mlflow.pytorch.log_model(model,
serialization_format="pickle"), with code_paths=[your package] or the package installed): the
nn.Module itself comes back and fine-tunes. A pt2 (torch.export) model loads as an
inference-only graph and a TorchScript module does not go to other processes: both are refused
in one line, as is any other flavour.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reduce_ops.errors import ConfigError
from reduce_ops.tracking.modelrun import LoggedModel, ModelChildRun
from reduce_ops.tracking.runs import StageRun

ALLOW_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"    # MLflow's own switch
_LOADED: dict[tuple[str, str], Any] = {}    # (tracking URI, pinned URI) -> module, per process
_DOWNLOADS: list[str] = []                  # kept while the process lives: code_paths import


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI as given and the one version it names now (what DVC tracks)."""

    uri: str
    pinned: str              # models:/<name>/<version>, models:/m-<id> or runs:/<id>/<path>
    run_id: str | None       # the run that logged it
    version: str | None      # the registered model version, when there is one


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def resolve(uri: str, tracking: str, key: str = "model.uri") -> ResolvedModel:
    """Pin `uri` to what it names in the store at `tracking` now (an alias to its version);
    one line naming `key` when nothing is there."""
    from mlflow.exceptions import MlflowException

    from reduce_ops.tracking.store import check_store, client_for

    # a store away or not there is one line naming it, within seconds
    check_store(tracking, bool(os.environ.get("MLFLOW_TRACKING_URI")), create=False)
    client = client_for(tracking)
    try:
        if m := re.fullmatch(r"models:/([^/@]+)@([^/@]+)", uri):
            mv = client.get_model_version_by_alias(m[1], m[2])
            return ResolvedModel(uri, f"models:/{m[1]}/{mv.version}", mv.run_id, str(mv.version))
        if m := re.fullmatch(r"models:/([^/@]+)/([0-9]+)", uri):
            mv = client.get_model_version(m[1], m[2])
            return ResolvedModel(uri, uri, mv.run_id, str(mv.version))
        if m := re.fullmatch(r"models:/(m-[0-9a-f]+)", uri):
            return ResolvedModel(uri, uri, client.get_logged_model(m[1]).source_run_id, None)
        if m := re.fullmatch(r"runs:/([0-9a-f]+)/(.+)", uri):
            return ResolvedModel(uri, uri, client.get_run(m[1]).info.run_id, None)
    except MlflowException as exc:
        raise ConfigError(f"{key}: {uri} not found in the tracking store {tracking} "
                          f"({_first_line(exc)})") from None
    raise ConfigError(f"{key}: expected models:/<name>@<alias>, models:/<name>/<version> or "
                      f"runs:/<run id>/<path>, got {uri!r}")


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """MLflow switches (read when used) set for one call alone: unpickling a model that
    model.allow_pickle lets load, no progress bar on the terminal."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _download(pinned: str, tracking: str, key: str) -> Path:
    """The model's folder, downloaded into a folder kept while this process lives (the
    model's code_paths go on sys.path from there, for this process and those it spawns)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if not _DOWNLOADS:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _DOWNLOADS])
    _DOWNLOADS.append(tempfile.mkdtemp(prefix="reduce-ops-model-"))
    try:
        with _environ(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
            return Path(mlflow.artifacts.download_artifacts(pinned, dst_path=_DOWNLOADS[-1],
                                                            tracking_uri=tracking,
                                                            registry_uri=tracking))
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"{key}: cannot download {pinned} from {tracking} "
                          f"({_first_line(exc)})") from None


def load_module(pinned: str, tracking: str, allow_pickle: bool,
                key: str = "model.uri") -> Any:
    """The model `pinned` names as a trainable torch.nn.Module in eval mode (a fresh copy per
    call; downloaded once per process)."""
    cached = _LOADED.get((tracking, pinned))
    if cached is not None:
        return copy.deepcopy(cached)
    import mlflow.pytorch
    import torch
    from mlflow.models import Model

    local = _download(pinned, tracking, key)
    try:
        flavors = Model.load(str(local)).flavors
    except Exception as exc:  # noqa: BLE001 - not an MLflow model folder at all
        raise ConfigError(f"{key}: {pinned} is not an MLflow model ({_first_line(exc)})") from None
    if "pytorch" not in flavors:
        raise ConfigError(f"{key}: {pinned} has no pytorch flavour (it has: "
                          f"{', '.join(sorted(flavors))}); reduce-ops fine-tunes a PyTorch "
                          f"model: log it with mlflow.pytorch.log_model(model, "
                          f"serialization_format='pickle'), or use model.source: python")
    data = local / flavors["pytorch"].get("model_data", "data")
    if (data / "model.pt2").is_file():
        raise ConfigError(f"{key}: {pinned} is a pt2 (torch.export) model, an inference-only "
                          f"graph that cannot be fine-tuned; log the nn.Module with "
                          f"serialization_format='pickle' (and code_paths=[your package]), or "
                          f"use model.source: python with its state_dict")
    if not allow_pickle and os.environ.get(ALLOW_PICKLE_ENV, "").lower() not in ("true", "1"):
        raise ConfigError(f"{key}: {pinned} is saved with pickle, and loading it runs code from "
                          f"the file: set model.allow_pickle: true if you trust it")
    try:
        with _environ(**{ALLOW_PICKLE_ENV: "true"}):
            module = mlflow.pytorch.load_model(str(local), weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a missing class, a broken file: one line
        raise ConfigError(f"{key}: cannot load {pinned} ({type(exc).__name__}: "
                          f"{_first_line(exc)}); log it with code_paths=[your package] or "
                          f"install the package that defines its class") from None
    if isinstance(module, torch.jit.ScriptModule) or not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{key}: {pinned} loads as a {type(module).__name__}, not a "
                          f"trainable torch.nn.Module; log the nn.Module itself")
    _LOADED[(tracking, pinned)] = module.eval()
    return copy.deepcopy(module)


def log_stage_model(stage: StageRun, model: Any, input_example: Any,
                    pip_requirements: Sequence[str], note: str) -> LoggedModel:
    """Log `model` (pt2, pickle if export fails) on the stage's own run, which is MLflow's
    active run while the stage runs, with `note` as the run's description."""
    logged = ModelChildRun(stage.run_id, stage).log_pytorch_model(model, input_example,
                                                                  pip_requirements)
    stage.describe(note)
    return logged

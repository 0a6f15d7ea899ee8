"""The baseline a user gives instead of one that pretrain trains (model.source mlflow | python):
loaded as a trainable nn.Module and checked against the prepared data; the `arch` entry that
rebuilds its module in every later stage; and what the `source` stage records of it, so that
DVC re-runs what follows when it changes."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reduce_ops import usercode
from reduce_ops.config import Config
from reduce_ops.errors import ConfigError
from reduce_ops.provenance import file_sha256
from reduce_ops.tracking.store import tracking_uri

if TYPE_CHECKING:      # torch is imported where a model is loaded: `source` records without it
    import torch
    from torch import nn


@dataclass(frozen=True)
class Given:
    """A user's trained baseline, what rebuilds its module, and what to call it."""

    model: nn.Module
    arch: dict[str, Any]      # models.architecture's entry (without exclude_layers)
    label: str                # the pinned model URI, or factory + weights file
    key: str                  # the params key its problems are reported under


def code_dir(cfg: Config) -> Path | None:
    """paths.code as an absolute folder (None when unset)."""
    return cfg.path("code").resolve() if cfg.paths.code else None


def _factory_module(spec: str, code: Path | None, key: str = "model.factory") -> nn.Module:
    from torch import nn

    module = usercode.call(spec, code, key)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{key}: {spec}() returned a {type(module).__name__}, not a "
                          f"torch.nn.Module")
    return module


def _flat(exc: BaseException) -> str:
    """An exception's message on one line (load_state_dict's spans several)."""
    return " ".join(str(exc).split())[:400] or type(exc).__name__


def read_state_dict(path: Path, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state_dict file, loaded with weights_only=True (no code runs); a reduce-ops checkpoint
    ({'state_dict': ...}) works too."""
    import torch

    if not path.is_file():
        raise ConfigError(f"{key}: {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ConfigError(f"{key}: {path} does not load with weights_only=True ({_flat(exc)}); "
                          f"save the weights with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor)
                                                       for v in obj.values()):
        raise ConfigError(f"{key}: {path} holds a {type(obj).__name__}, not a state_dict "
                          f"(torch.save(model.state_dict(), path))")
    return obj


def load_given(cfg: Config) -> Given:
    """The baseline model.source names, with its weights, in eval mode on the CPU."""
    m = cfg.model
    if m.source == "python":
        code = code_dir(cfg)
        module = _factory_module(m.factory, code)
        weights = cfg.root / m.weights
        state = read_state_dict(weights)
        try:
            module.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"model.weights: {m.weights} does not fit the module "
                              f"{m.factory}() builds ({_flat(exc)})") from None
        arch = {"source": "python", "factory": m.factory,
                "code": str(code) if code is not None else None}
        return Given(module.eval(), arch, f"{m.factory} with {m.weights}", "model.factory")
    if m.source == "mlflow":
        from reduce_ops.tracking.models import load_module, resolve

        store = tracking_uri(cfg.root)
        resolved = resolve(m.uri, store)
        module = load_module(resolved.pinned, store, m.allow_pickle)
        arch = {"source": "mlflow", "uri": resolved.pinned, "tracking_uri": store}
        label = resolved.pinned + (f" ({m.uri})" if resolved.pinned != m.uri else "")
        return Given(module.eval(), arch, label, "model.uri")
    raise ValueError(f"model.source {m.source} is trained by pretrain, not given")


def skeleton(arch: dict[str, Any], tracking: str | None = None) -> nn.Module:
    """The module a user's baseline has (its weights follow from the checkpoint)."""
    if arch["source"] == "python":
        return _factory_module(arch["factory"], Path(arch["code"]) if arch.get("code") else None)
    if arch["source"] == "mlflow":
        from reduce_ops.tracking.models import load_module

        # pretrain loaded it with model.allow_pickle (or MLflow's own switch) on
        return load_module(arch["uri"], tracking or arch["tracking_uri"], True)
    raise ConfigError(f"unknown model source {arch['source']!r} in a checkpoint")


def check_fits_data(given: Given, x: torch.Tensor, num_classes: int) -> None:
    """The model reads the prepared images and returns one logit per class: one line naming
    the key that gave it when not."""
    import torch

    try:
        with torch.no_grad():
            out = given.model.eval()(x[:2])
    except Exception as exc:  # noqa: BLE001 - the user's forward pass
        raise ConfigError(f"{given.key}: {given.label} fails on the prepared images "
                          f"{list(x[:2].shape)} ({type(exc).__name__}: {_flat(exc)})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x[:2]), num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{given.key}: {given.label} returns {shape} for images "
                          f"{list(x[:2].shape)}; expected [{len(x[:2])}, {num_classes}], one "
                          f"logit per class of the dataset")


def fingerprint(cfg: Config) -> dict[str, Any]:
    """What DVC sees of the baseline source: it changes when the model does (a new version
    behind the alias, new weights, an edited factory module), and only then."""
    m = cfg.model
    if m.source == "zoo":
        return {"source": "zoo", "name": m.name}
    if m.source == "python":
        weights = cfg.root / m.weights
        if not weights.is_file():
            raise ConfigError(f"model.weights: {weights}: no such file")
        module = usercode.module_file(m.factory, code_dir(cfg), "model.factory")
        return {"source": "python", "factory": m.factory,
                "factory_file_sha256": file_sha256(module) if module else None,
                "weights": m.weights, "weights_sha256": file_sha256(weights)}
    from reduce_ops.tracking.models import resolve

    resolved = resolve(m.uri, tracking_uri(cfg.root))
    return {"source": "mlflow", "uri": m.uri, "resolved": resolved.pinned,
            "version": resolved.version, "run_id": resolved.run_id}

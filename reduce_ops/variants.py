"""Baseline variants (activation threshold x sharpness method): what makes one, reading their
trained models back checked against `variants` in params."""

from __future__ import annotations

import math
from typing import Any

from reduce_ops.config import Config, VariantConfig
from reduce_ops.errors import DataError
from reduce_ops.models import load_checkpoint
from reduce_ops.names import BASELINE_MEASURES

SETTINGS = ("activation_threshold", "sharpness", "rho")


def settings(variant: VariantConfig) -> dict[str, Any]:
    """What makes a variant: saved with its checkpoint and checked when it is read."""
    return {k: getattr(variant, k) for k in SETTINGS}


def load_variants(cfg: Config, dataset_hash: str,
                  device: Any = "cpu") -> dict[str, tuple[Any, dict[str, Any]]]:
    """(model, checkpoint info) of every configured variant, by name; one line naming the file
    when one is missing, was trained on other data or with other settings than `variants`
    says."""
    out = {}
    for i, variant in enumerate(cfg.variants):
        path = cfg.path("variants") / f"{variant.name}.pt"
        if not path.is_file():
            raise DataError(f"{path}: no model for variants[{i}] ({variant.name}); run "
                            f"`reduce-ops variants` first")
        model, ckpt = load_checkpoint(path, device)
        info = ckpt["info"]
        if info.get("dataset_hash") != dataset_hash:
            raise DataError(f"{path}: trained on another prepared dataset; run "
                            f"`reduce-ops variants` again")
        trained_with = {k: info.get(k) for k in SETTINGS}
        if trained_with != settings(variant):
            raise DataError(f"{path}: trained with {trained_with}, variants[{i}] says "
                            f"{settings(variant)}; run `reduce-ops variants` again")
        out[variant.name] = (model, info)
    return out


def describe_variant(info: dict[str, Any]) -> dict[str, Any]:
    """A model's settings and measures as its checkpoint recorded them (NaN where an older
    checkpoint did not)."""
    keys = ("activation_threshold", "sharpness", "rho", *BASELINE_MEASURES[:2])
    defaults = {"activation_threshold": 0.0, "sharpness": "none", "rho": 0.0}
    return {k: info.get(k, defaults.get(k, math.nan)) for k in keys}

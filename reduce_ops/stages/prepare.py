"""`reduce-ops prepare`: read the dataset source, write the seeded stratified split."""

from __future__ import annotations

from typing import Any

from reduce_ops.config import Config
from reduce_ops.data import prepare


def run(cfg: Config) -> dict[str, Any]:
    """Write paths.prepared; returns its meta.json content."""
    out = cfg.path("prepared")
    meta = prepare(cfg.data, cfg.path("raw"), out, cfg.root,
                   cfg.path("code") if cfg.paths.code else None)
    sizes = ", ".join(f"{k} {v}" for k, v in meta["split_sizes"].items())
    print(f"prepared {meta['source']}: {sizes}; input {tuple(meta['input_shape'])}, "
          f"{meta['num_classes']} classes, hash {meta['dataset_hash'][:12]} -> {out}")
    return meta

"""`reduce-ops source`: record what the model and data sources are now (the MLflow version an
alias names, the hashes of a user's files), for DVC: the stage runs on every `dvc repro`, and
what follows re-runs only when a record changed."""

from __future__ import annotations

from typing import Any

from reduce_ops import atomic, sources
from reduce_ops.config import Config


def run(cfg: Config) -> dict[str, Any]:
    """Write results/source/model.json and data.json; returns their content."""
    found = sources.fingerprints(cfg)            # both resolved before either is written
    out = sources.directory(cfg.path("results"))
    for name, content in found.items():
        atomic.write_json(out / name, content)
    model, data = found[sources.MODEL_FILE], found[sources.DATA_FILE]
    what = {"zoo": f"zoo {model.get('name')}", "mlflow": f"{model.get('resolved')}",
            "python": f"{model.get('factory')} with {model.get('weights')}"}[model["source"]]
    print(f"source: model {what}; data {data['source']} -> {out}")
    return found

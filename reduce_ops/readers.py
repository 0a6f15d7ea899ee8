"""Dataset readers beyond the bundled sets: a user's arrays (data.source npz), a user's function
(data.source function) returning arrays or torch Datasets, and the CIFAR-10 python batches.
Each gives a data.RawDataset of uint8 [N, C, H, W] images; a problem is one line naming the
params key or the file."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reduce_ops import usercode
from reduce_ops.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- images and labels

def images(x: Any, where: str) -> np.ndarray:
    """Images as uint8 [N, C, H, W]: from [N, H, W] (one channel), [N, C, H, W], or
    channels-last [N, H, W, C] (C of 1 or 3); uint8 or integers 0-255, or floats in [0, 1]."""
    if hasattr(x, "detach"):                       # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)                # [N, H, W, C] -> [N, C, H, W]
    if x.ndim != 4 or len(x) == 0:
        raise DataError(f"{where}: expected images [N, C, H, W] or [N, H, W], got shape "
                        f"{list(x.shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if np.issubdtype(x.dtype, np.floating) and 0.0 <= lo and hi <= 1.0:
        return np.rint(x * 255.0).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) and 0 <= lo and hi <= 255:
        return x.astype(np.uint8)
    raise DataError(f"{where}: pixel values must be uint8 0-255 or floats in [0, 1], got "
                    f"{x.dtype} in [{lo:g}, {hi:g}]")


def labels(y: Any, n: int, where: str) -> np.ndarray:
    """Class indices as int64 [N]."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer) or \
            (n and y.min() < 0):
        raise DataError(f"{where}: labels must be {n} class indices (integers >= 0), got "
                        f"{y.dtype} of shape {list(y.shape)}")
    return y.astype(np.int64)


def _from_dataset(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A torch Dataset (or any sequence) of (image, label): tensors [C, H, W] (as ToTensor
    gives, in [0, 1]) or uint8, numpy arrays, or PIL images."""
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{where}: item {i} is a {type(item).__name__}, not (image, label)")
        img, label = item
        if hasattr(img, "detach"):
            img = img.detach().cpu().numpy()
        arr = np.asarray(img)
        if hasattr(img, "mode"):                     # PIL: [H, W] or [H, W, C]
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        xs.append(arr)
        ys.append(int(label))
    if not xs:
        raise DataError(f"{where}: the dataset is empty")
    try:
        stacked = np.stack(xs)
    except ValueError:
        raise DataError(f"{where}: images of different shapes") from None
    return stacked, np.asarray(ys, dtype=np.int64)


def from_splits(splits: Mapping[str, tuple[Any, Any]], classes: Any, where: str) -> Any:
    """A RawDataset from {split: (images, labels)}: train required, val and test optional."""
    from reduce_ops.data import RawDataset

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in SPLITS:
        if name not in splits:
            continue
        x = images(splits[name][0], f"{where} {name} images")
        out[name] = (x, labels(splits[name][1], len(x), f"{where} {name} labels"))
    shapes = {name: list(x.shape[1:]) for name, (x, _) in out.items()}
    if len({str(s) for s in shapes.values()}) > 1:
        raise DataError(f"{where}: the splits' images differ in shape: {shapes}")
    n_classes = max(int(y.max()) for _, y in out.values()) + 1
    if classes is None:
        classes = [str(i) for i in range(n_classes)]
    classes = [str(c) for c in np.asarray(classes).tolist()]
    if len(classes) < n_classes:
        raise DataError(f"{where}: {len(classes)} class names for labels up to {n_classes - 1}")
    x, y = out["train"]
    test, val = out.get("test", (None, None)), out.get("val", (None, None))
    return RawDataset(x, y, classes, test[0], test[1], val[0], val[1])


# --------------------------------------------------------------------------- a user's arrays

def load_npz(path: Path, key: str = "data.path") -> Any:
    """x_<split>, y_<split> for train (required), val and test (optional), and optionally
    classes (names), from an .npz read without pickle."""
    if not path.is_file():
        raise DataError(f"{key}: {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{key}: {path}: not a readable .npz ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    held = ", ".join(sorted(arrays)) or "nothing"
    for name in SPLITS:
        if (f"x_{name}" in arrays) != (f"y_{name}" in arrays):
            have, lack = (f"x_{name}", f"y_{name}") if f"x_{name}" in arrays else \
                (f"y_{name}", f"x_{name}")
            raise DataError(f"{key}: {path} has {have} but no {lack} (it holds: {held})")
    if "x_train" not in arrays:
        raise DataError(f"{key}: {path} has no train split: x_train and y_train are needed, "
                        f"x_val/y_val and x_test/y_test are optional (it holds: {held})")
    splits = {name: (arrays[f"x_{name}"], arrays[f"y_{name}"]) for name in SPLITS
              if f"x_{name}" in arrays}
    return from_splits(splits, arrays.get("classes"), f"{key}: {path}")


def load_function(spec: str, code: Path | None, key: str = "data.function") -> Any:
    """Call the user's function: {'train': ..., 'val': ..., 'test': ..., 'classes': [...]},
    each split (images, labels) or a torch Dataset of (image, label); train required."""
    result = usercode.call(spec, code, key)
    if not isinstance(result, Mapping) or "train" not in result:
        what = (f"keys {sorted(map(str, result))}" if isinstance(result, Mapping)
                else f"a {type(result).__name__}")
        raise ConfigError(f"{key}: {spec}() returned {what}; expected a dict with 'train' (and "
                          f"optionally 'val', 'test', 'classes')")
    splits = {}
    for name in SPLITS:
        if name not in result:
            continue
        part = result[name]
        where = f"{key}: {spec}()['{name}']"
        if isinstance(part, (tuple, list)) and len(part) == 2 and \
                len(getattr(part[0], "shape", ())) >= 3:        # (images, labels) arrays
            splits[name] = part
        elif hasattr(part, "__getitem__") and hasattr(part, "__len__"):
            splits[name] = _from_dataset(part, where)
        else:
            raise ConfigError(f"{where}: a {type(part).__name__}; expected (images, labels) or "
                              f"a torch Dataset of (image, label)")
    return from_splits(splits, result.get("classes"), f"{key}: {spec}()")


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]


class _BatchUnpickler(pickle.Unpickler):
    """The CIFAR-10 python batches are pickles: only numpy arrays and plain containers are let
    through, so a file that is not one cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                           "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}     # how protocol-2 pickles spell bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def _batch(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            d = _BatchUnpickler(f, encoding="latin1").load()
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: "
                        f"{exc})") from None


def load_cifar10(folder: Path) -> Any:
    """The 50,000 training and 10,000 test images of the extracted 'CIFAR-10 python version'
    archive (data_batch_1..5, test_batch, batches.meta): each batch's 'data' is [N, 3072]
    uint8, the red, green and blue planes of a 32x32 image, and 'labels' its classes."""
    from reduce_ops.data import RawDataset

    def arrays(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            d = _batch(folder / name)
            if "data" not in d or "labels" not in d:
                raise DataError(f"{folder / name}: a CIFAR-10 batch has 'data' and 'labels', "
                                f"this one {sorted(d)}")
            try:
                x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(d["labels"], dtype=np.int64).reshape(-1)
            except (ValueError, TypeError) as exc:
                raise DataError(f"{folder / name}: not CIFAR-10 images and labels ({exc})"
                                ) from None
            if len(x) != len(y):
                raise DataError(f"{folder / name}: {len(x)} images but {len(y)} labels")
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    x, y = arrays(CIFAR10_FILES[:5])
    xt, yt = arrays(["test_batch"])
    names = _batch(folder / "batches.meta").get("label_names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names else \
        [str(i) for i in range(10)]
    return RawDataset(x, y, classes, xt, yt)

"""Bring your own model and data: a user's trained network (BatchNorm, a depthwise convolution,
a residual connection) from their MLflow registry or their own package, their arrays, their
normalisation. The pipeline runs from params alone; every champion is exactly zero on its own
chip's faulty PEs and serves raw images to a client that has nothing but the model URI."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_PIPELINE, clone_project, make_project, run_stages, tiny_params
from torch import nn

from reduce_ops import names
from reduce_ops.cli import main
from reduce_ops.config import ConfigError, from_dict, load_config
from reduce_ops.data import load_prepared, prepare
from reduce_ops.errors import DataError
from reduce_ops.hardware import ArrayGeometry, build_masks, mapped_layers, uniform_fault_map
from reduce_ops.models import Preprocess, load_checkpoint
from reduce_ops.training import evaluate

BIN = Path(sys.executable).parent

# --------------------------------------------------------------------------- the user's side

USER_MODEL = '''
"""A user's network: BatchNorm, a depthwise convolution and a residual connection."""
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)    # depthwise
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.pw(self.dw(x))))              # residual


class DigitNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.block = Block(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


def build():
    return DigitNet()


def not_a_model():
    return 42
'''

# The user's own training on digits with their normalisation ((x / 255 - 0.5) / 0.5), then
# what they do with the model: register it in MLflow, or save its state_dict and their arrays.
USER_TRAIN = '''
import sys
import numpy as np
import torch
from sklearn.datasets import load_digits

from PKG.model import build

what, epochs = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
d = load_digits()
x = np.clip(np.rint(d.data * (255.0 / 16.0)), 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
y = d.target.astype(np.int64)
xt, yt = (torch.from_numpy(x).float() / 255.0 - 0.5) / 0.5, torch.from_numpy(y)
model = build()
opt = torch.optim.Adam(model.parameters(), lr=0.01)
for epoch in range(epochs):
    perm = torch.randperm(len(yt))
    for i in range(0, len(yt), 64):
        idx = perm[i:i + 64]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
model.eval()
if what == "npz":
    np.savez("digits.npz", x_train=x[:1400], y_train=y[:1400], x_test=x[1400:],
             y_test=y[1400:], classes=np.array([f"digit {i}" for i in range(10)]))
    torch.save(model.state_dict(), "weights.pt")
else:
    import mlflow
    from mlflow.tracking import MlflowClient

    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        code_paths=["PKG"], pip_requirements=["torch"],
                                        registered_model_name=sys.argv[3])
    MlflowClient().set_registered_model_alias(sys.argv[3], "prod",
                                              info.registered_model_version)
'''

# A client with nothing but model URIs: never imports reduce_ops; raw uint8 images in.
CLIENT = '''
import json, sys
import numpy as np
import mlflow
from mlflow.tracking import MlflowClient

uri, npz, models = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
mlflow.set_tracking_uri(uri)
with np.load(npz) as d:
    splits = {s: (d[f"x_{s}"], d[f"y_{s}"]) for s in ("val", "test")}
out = {}
for model_uri in models:
    model = mlflow.pyfunc.load_model(model_uri)
    acc = {}
    for s, (x, y) in splits.items():
        logits = np.concatenate([model.predict(x[i:i + 256]) for i in range(0, len(x), 256)])
        acc[s] = float((logits.argmax(1) == y).mean())
    out[model_uri] = {"accuracy": acc, "input": str(model.metadata.get_input_schema())}
assert "reduce_ops" not in sys.modules
print(json.dumps(out))
'''


def write_user_package(folder: Path, pkg: str) -> Path:
    """A small Python package of the user's, outside the project: folder/pkg/model.py, and
    the script they train it with."""
    (folder / pkg).mkdir(parents=True)
    (folder / pkg / "__init__.py").write_text("")
    (folder / pkg / "model.py").write_text(USER_MODEL)
    (folder / "train.py").write_text(USER_TRAIN.replace("PKG", pkg))
    return folder


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return {**env, **extra}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def train_as_user(user: Path, env: dict[str, str], *args: str) -> None:
    """The user's script in the user's folder, with only their package on the path."""
    _run([sys.executable, "train.py", *args], user, {**env, "PYTHONPATH": str(user)})


def client_accuracies(uri: str, npz: Path, models: list[str], cwd: Path) -> dict:
    """Accuracy of each served model on the raw val and test images, in a fresh process."""
    env = _env(MLFLOW_TRACKING_URI=uri)
    env.pop("PYTHONPATH", None)
    out = _run([sys.executable, "-c", CLIENT, uri, str(npz), json.dumps(models)], cwd, env)
    return json.loads(out.strip().splitlines()[-1])


def check_champions(project: Path, uri: str) -> list[str]:
    """Every champion's weights are exactly zero on its own chip's faulty PEs (its trainable
    chip_model.pt and the pt2 model that ships agree); returns their registered names."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    import reduce_ops

    cfg = load_config(project / "params.yaml")
    chips = pd.read_csv(project / "results/fat/chips.csv", dtype={"chip_id": str})
    shipped = chips.loc[chips["status"] == "shipped", "chip_id"].tolist()
    assert shipped, "no chip shipped"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    registered = []
    for chip_id in shipped:
        model = reduce_ops.load_chip_model(chip_id, tracking_uri=uri)
        faulty = np.load(cfg.path("fleet") / f"{chip_id}.npy")
        masks = build_masks(model, faulty, cfg.hardware.layer_types)
        assert masks and not all(bool(m.all()) for m in masks.values())
        params = dict(model.named_parameters())
        for name, keep in masks.items():
            assert torch.count_nonzero(params[name].detach()[~keep]) == 0, (chip_id, name)
        name = names.registered_name(cfg.registry.prefix, chip_id)
        served = mlflow.pytorch.load_model(f"models:/{name}@champion")       # the pt2 graph
        shipped_state = served.state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(shipped_state[f"net.{key}"], value), (chip_id, key)
        assert "uint8" in MlflowClient(uri).get_registered_model(name).description
        registered.append(name)
    return registered


def check_served(project: Path, uri: str, registered: list[str]) -> None:
    """A client classifies raw test images with each champion at the version's recorded
    accuracy (and validation at what verification measured: BatchNorm as it ships), and
    with the baseline's logged model at the baseline's."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ckpt = torch.load(project / "models/baseline.pt", weights_only=True)
    baseline = f"runs:/{ckpt['info']['run_id']}/model"
    models = [f"models:/{n}@champion" for n in registered]
    measured = client_accuracies(uri, project / "data/prepared/dataset.npz", [*models, baseline],
                                 project)
    for name, model_uri in zip(registered, models):
        tags = client.get_model_version_by_alias(name, "champion").tags
        got = measured[model_uri]
        assert got["accuracy"]["test"] == float(tags["test_accuracy"]), name
        assert got["accuracy"]["val"] == float(tags["val_accuracy"]), name
        assert "uint8" in got["input"]
    record = json.loads((project / "results/pretrain/metrics.json").read_text())
    assert measured[baseline]["accuracy"]["test"] == record["test_accuracy"]


# --------------------------------------------------------------------------- whole pipelines

@pytest.mark.slow
def test_a_registered_model_runs_the_pipeline_from_params_alone(tmp_path: Path) -> None:
    """model.source mlflow: the user's model, registered in the team's store, goes through
    `dvc repro` with only params.yaml changed; a new version behind the alias re-runs
    pretrain and what follows, nothing else does."""
    from mlflow.tracking import MlflowClient

    user = write_user_package(tmp_path / "user", "byo_registry_net")
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    env = _env(MLFLOW_TRACKING_URI=uri)
    train_as_user(user, env, "mlflow", "6", "digit-net")
    project = tmp_path / "project"
    make_project(project, [*TINY_PIPELINE, "model.source=mlflow",
                           "model.uri=models:/digit-net@prod", "model.allow_pickle=true",
                           "data.mean=[0.5]", "data.std=[0.5]"])
    _run(["git", "init", "-q"], project, env)
    _run([str(BIN / "dvc"), "init", "-q"], project, env)
    out = _run([str(BIN / "dvc"), "repro"], project, env)
    for stage in ("source", "prepare", "pretrain", "resilience", "plan", "group", "fat",
                  "compare", "robustness"):
        assert f"Running stage '{stage}'" in out, stage
    assert "array mapping: 4 layers on the 16x16 array" in out
    assert json.loads((project / "results/source/model.json").read_text())["resolved"] == \
        "models:/digit-net/1"
    registered = check_champions(project, uri)
    check_served(project, uri, registered)

    again = _run([str(BIN / "dvc"), "repro"], project, env)
    assert [line for line in again.splitlines() if "Running stage" in line] == [
        "Running stage 'source':"]
    # the user registers a new version and moves the alias: pretrain is out of date
    client = MlflowClient(uri)
    v1 = client.get_model_version("digit-net", "1")
    v2 = client.create_model_version("digit-net", v1.source, run_id=v1.run_id)
    client.set_registered_model_alias("digit-net", "prod", v2.version)
    _run([str(BIN / "dvc"), "repro", "source"], project, env)
    status = json.loads(_run([str(BIN / "dvc"), "status", "--json"], project, env))
    assert "results/source/model.json" in json.dumps(status.get("pretrain"))
    assert "prepare" not in status


@pytest.mark.slow
def test_a_factory_with_its_weights_on_npz_data(tmp_path: Path) -> None:
    """model.source python (a factory from the user's folder, paths.code, and a state_dict
    loaded weights-only) on data.source npz, with the stem left off the array."""
    user = write_user_package(tmp_path / "user", "byo_factory_net")
    train_as_user(user, _env(), "npz", "6")
    project = tmp_path / "project"
    make_project(project, [*TINY_PIPELINE, f"paths.code={user}", "model.source=python",
                           "model.factory=byo_factory_net.model:build",
                           f"model.weights={user / 'weights.pt'}", "data.source=npz",
                           f"data.path={user / 'digits.npz'}", "data.mean=[0.5]",
                           "data.std=[0.5]", "hardware.exclude_layers=[stem]"])
    run_stages(project, "source", "prepare", "faultmaps", "pretrain", "resilience", "plan",
               "group", "fat", "compare", "variants", "robustness")
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["split_sizes"]["test"] == 1797 - 1400          # the user's test split, kept
    assert meta["classes"][3] == "digit 3" and meta["mean"] == [0.5]
    ckpt = torch.load(project / "models/baseline.pt", weights_only=True)
    assert ckpt["arch"]["source"] == "python" and ckpt["arch"]["exclude_layers"] == ["stem"]
    uri = f"sqlite:///{project / 'mlflow.db'}"
    registered = check_champions(project, uri)
    model, _ = load_checkpoint(project / "models/baseline.pt")
    assert "stem.0" not in mapped_layers(model) and "block.dw" in mapped_layers(model)
    check_served(project, uri, registered)


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def byo_prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(project, user): a prepared digits project of this module's own, a user package beside
    it, and in the project's store the user's model registered twice: pickled (user-pickle)
    and exported as pt2 (user-pt2)."""
    import mlflow
    import mlflow.pytorch

    project = tmp_path_factory.mktemp("byo") / "project"
    make_project(project)
    run_stages(project, "prepare")
    user = write_user_package(tmp_path_factory.mktemp("user"), "byo_bad_net")
    sys.path.insert(0, str(user))
    from byo_bad_net.model import build       # noqa: E402 - the user's package, just written

    torch.manual_seed(0)
    model = build().eval()
    torch.save(model.state_dict(), user / "weights.pt")
    torch.save(nn.Linear(3, 2).state_dict(), user / "other.pt")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run():
        for fmt in ("pickle", "pt2"):
            mlflow.pytorch.log_model(model, name=fmt, serialization_format=fmt,
                                     input_example=np.zeros((2, 1, 8, 8), np.float32),
                                     pip_requirements=["torch"],
                                     registered_model_name=f"user-{fmt}")
    np.savez(user / "no_labels.npz", x_train=np.zeros((10, 1, 8, 8), np.uint8))
    return project, user


BAD = {
    "unknown uri": (["model.source=mlflow", "model.uri=models:/nope@prod",
                     "model.allow_pickle=true"], "model.uri: models:/nope@prod not found"),
    "pt2 export": (["model.source=mlflow", "model.uri=models:/user-pt2/1",
                    "model.allow_pickle=true"], "model.uri: .* is a pt2 .* cannot be fine-tuned"),
    "pickle not allowed": (["model.source=mlflow", "model.uri=models:/user-pickle/1"],
                           "saved with pickle.*set model.allow_pickle: true"),
    "no such package": (["model.source=python", "model.factory=no_such_pkg.model:build",
                         "model.weights=USER/weights.pt"],
                        "model.factory: cannot import 'no_such_pkg.model'"),
    "no module returned": (["paths.code=USER", "model.source=python",
                            "model.factory=byo_bad_net.model:not_a_model",
                            "model.weights=USER/weights.pt"],
                           "model.factory: .*not_a_model\\(\\) returned a int, not a torch"),
    "state_dict does not fit": (["paths.code=USER", "model.source=python",
                                 "model.factory=byo_bad_net.model:build",
                                 "model.weights=USER/other.pt"],
                                "model.weights: .*other.pt does not fit .*Missing key"),
    "unknown excluded layer": (["hardware.exclude_layers=[classifer]"],
                               "hardware.exclude_layers: no layer 'classifer' in the model "
                               "\\(did you mean 'classifier'\\?\\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_baseline_source_is_one_line_exit_2_nothing_written(
        case: str, byo_prepared: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    from reduce_ops.tracking.runs import find_runs

    prepared, user = byo_prepared
    overrides, message = BAD[case]
    overrides = [o.replace("USER", str(user)) for o in overrides]
    project = clone_project(prepared, tmp_path / "p", overrides)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(project)
        code = main(["pretrain", "--params", str(project / "params.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (project / "models/baseline.pt").exists()
    assert not (project / "results/pretrain").exists()
    assert not find_runs(f"sqlite:///{project / 'mlflow.db'}", {names.TAG_STAGE: "pretrain"})


def test_npz_without_a_split_is_one_line_exit_2_nothing_written(
        byo_prepared: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    user = byo_prepared[1]
    params = make_project(tmp_path / "p", ["data.source=npz",
                                           f"data.path={user / 'no_labels.npz'}"])
    capsys.readouterr()
    assert main(["prepare", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.path" in err and "x_train but no y_train" in err
    assert not (tmp_path / "p/data/prepared").exists()
    assert main(["source", "--params", str(params)]) == 0      # the file is there: it is hashed


def test_source_keys_are_checked_with_the_params() -> None:
    cases = {("model.source=mlflow",): "model.uri: needed by model.source mlflow",
             ("model.uri=models:/x/1",): "model.uri: set, but model.source is zoo",
             ("model.source=mlflow", "model.uri=s3://bucket/model"): "model.uri: expected",
             ("model.source=python", "model.factory=pkg.mod", "model.weights=w.pt"):
                 "model.factory: expected package.module:function",
             ("model.source=python", "model.factory=a.b:c", "model.weights=w.pt",
              "variants=[{name: v, activation_threshold: 0.0, sharpness: none, rho: 0.0}]"):
                 "variants: are trained from scratch",
             ("data.source=npz",): "data.path: needed by data.source npz",
             ("data.mean=[0.5]",): "data.mean and data.std",
             ("data.mean=[0.5]", "data.std=[0.0]"): "data.std: every value must be > 0",
             ("hardware.exclude_layers=[a, a]",): "hardware.exclude_layers: a name listed twice"}
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
            from_dict(tiny_params(list(overrides)))


# --------------------------------------------------------------------------- BatchNorm, serving

class _BnNet(nn.Module):
    """BatchNorm, depthwise, residual: as a user's network has them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = x + torch.relu(self.bn2(self.dw(x)))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


def test_batchnorm_statistics_follow_fat_and_verification_reads_the_shipped_model(
        prepared_digits) -> None:
    """FAT trains with BatchNorm in train mode: its running statistics follow the pruned
    weights (measured better recovery than frozen ones, see README). Verification measures the
    model in eval mode on those statistics, and that is the model that ships: the float
    module, and the raw-input graph exported from it, score exactly what verification read."""
    from reduce_ops.config import load_config as load
    from reduce_ops.hardware import FaultMap
    from reduce_ops.retraining import worker
    from reduce_ops.retraining.units import ChipJob, Unit
    from reduce_ops.shipping import ShippingRule

    from reduce_ops.training import batches, train_steps

    data = prepared_digits
    torch.manual_seed(0)
    baseline = _BnNet()
    train_steps(baseline, torch.optim.Adam(baseline.parameters(), lr=0.01), data.x["train"],
                data.y["train"], batches(len(data.y["train"]), 64, torch.Generator()), 60)
    baseline.eval()
    fat = load(Path(__file__).resolve().parents[1] / "params.yaml").fat
    fmap = uniform_fault_map(ArrayGeometry(16, 16), 0.2, seed=3, chip_id="c")
    job = ChipJob("c", fmap.fault_rate, 0.5, True, "", FaultMap("c", fmap.faulty))
    rule = ShippingRule(0.0, 0.0, 0.0, 0.25, 1.0)
    before = baseline.bn2.running_mean.clone()
    trained = worker.train(Unit.chip(job), baseline, data, worker.TrainSettings(
        fat, ("conv", "linear"), "cpu", rule))
    model = trained.model
    assert not model.training
    assert torch.equal(baseline.bn2.running_mean, before)             # the baseline untouched
    assert not torch.allclose(model.bn2.running_mean, before)         # updated during FAT
    stats = model.bn2.running_mean.clone()
    assert evaluate(model, data.x["val"], data.y["val"])[0] == trained.val_accuracy
    assert torch.equal(model.bn2.running_mean, stats)                 # measuring changes nothing
    for name, keep in build_masks(model, fmap).items():
        assert torch.count_nonzero(dict(model.named_parameters())[name].detach()[~keep]) == 0
    # what ships: raw uint8 pixels in, normalised inside, eval mode, exported as MLflow does
    pre = Preprocess.from_meta(data.meta)
    model.train()                          # even a model left in train mode ships in eval
    served = pre.wrap(model)
    assert not served.training and not model.training
    raw = pre.raw(data.x["val"])
    exported = torch.export.export(served, (raw[:2],),
                                   dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    with torch.no_grad():
        for m in (served, exported):
            right = int((m(raw).argmax(1) == data.y["val"]).sum())
            assert right / len(raw) == trained.val_accuracy > 0.5


def test_served_model_takes_raw_pixels_and_gives_the_same_logits(prepared_digits) -> None:
    data = prepared_digits
    pre = Preprocess.from_meta(data.meta)
    raw = pre.raw(data.x["test"])
    assert raw.dtype == torch.uint8
    # the normalised tensors come back to exactly the pixels they were made from
    renorm = (raw.float().div(255.0) - torch.tensor(pre.mean).view(1, -1, 1, 1)) / \
        torch.tensor(pre.std).view(1, -1, 1, 1)
    assert torch.equal(renorm, data.x["test"])
    torch.manual_seed(0)
    net = _BnNet().eval()
    with torch.no_grad():
        assert torch.equal(pre.wrap(net)(raw), net(data.x["test"]))
    assert "uint8 [N, 1, 8, 8]" in pre.describe() and "logits [N, 10]" in pre.describe()


# --------------------------------------------------------------------------- data sources

def _write_cifar(folder: Path, n: int = 12) -> dict[str, np.ndarray]:
    """Synthetic files in the CIFAR-10 python format: pickled dicts of 'data' [N, 3072] uint8
    (red, green, blue planes) and 'labels', and batches.meta with 'label_names'."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(n) % 10]
        with (folder / name).open("wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{i}.png" for i in range(n)]}, f, protocol=2)
        written[name] = data
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"],
                     "num_cases_per_batch": n, "num_vis": 3072}, f, protocol=2)
    return written


def test_cifar10_reader_on_synthetic_files_in_the_python_format(tmp_path: Path) -> None:
    cfg = from_dict(tiny_params(["data.source=cifar10", "data.val_fraction=0.2"]),
                    root=tmp_path)
    written = _write_cifar(cfg.path("raw") / "cifar-10-batches-py")
    meta = prepare(cfg.data, cfg.path("raw"), cfg.path("prepared"), cfg.root)
    assert meta["input_shape"] == [3, 32, 32] and meta["classes"][9] == "truck"
    assert meta["split_sizes"] == {"train": 48, "val": 12, "test": 12}   # the official test
    with np.load(cfg.path("prepared") / "dataset.npz") as npz:
        assert np.array_equal(npz["x_test"], written["test_batch"].reshape(-1, 3, 32, 32))
        assert npz["x_test"][0, 1, 0, 0] == written["test_batch"][0, 1024]   # green plane
    with (cfg.path("raw") / "cifar-10-batches-py/data_batch_3").open("wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_3: not CIFAR-10 images and labels"):
        prepare(cfg.data, cfg.path("raw"), cfg.path("prepared"), cfg.root)
    # a pickle that would run code is refused, not run
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with (cfg.path("raw") / "cifar-10-batches-py/data_batch_2").open("wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="data_batch_2: not a CIFAR-10 python batch .*not "
                                        "allowed"):
        prepare(cfg.data, cfg.path("raw"), cfg.path("prepared"), cfg.root)


def test_function_and_npz_sources_keep_their_splits(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    pkg = tmp_path / "code" / "byo_data_fn"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import numpy as np, torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def splits():\n"
        "    rng = np.random.default_rng(0)\n"
        "    x = rng.random((60, 3, 6, 6)).astype('float32')    # [0, 1] floats\n"
        "    y = np.arange(60) % 3\n"
        "    return {'train': (x[:40], y[:40]),\n"
        "            'val': TensorDataset(torch.from_numpy(x[40:50]),\n"
        "                                 torch.from_numpy(y[40:50])),\n"
        "            'test': (x[50:], y[50:]), 'classes': ['a', 'b', 'c']}\n")
    cfg = from_dict(tiny_params(["data.source=function", "data.function=byo_data_fn:splits",
                                 "paths.code=code", "data.mean=[0.5, 0.5, 0.5]",
                                 "data.std=[0.25, 0.25, 0.25]"]), root=tmp_path)
    meta = prepare(cfg.data, cfg.path("raw"), cfg.path("prepared"), cfg.root,
                   cfg.path("code"))
    assert meta["split_sizes"] == {"train": 40, "val": 10, "test": 10}
    assert meta["classes"] == ["a", "b", "c"] and meta["std"] == [0.25] * 3
    data = load_prepared(cfg.path("prepared"))
    from byo_data_fn import splits

    expected = np.rint(splits()["test"][0] * 255) / 255
    assert np.allclose(data.x["test"].numpy(), (expected - 0.5) / 0.25, atol=1e-6)
    assert isinstance(splits()["val"], TensorDataset)
    # npz with all three splits, channels last: kept as they are
    x = np.random.default_rng(1).integers(0, 256, (30, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", x_train=x[:20], y_train=np.arange(20) % 2, x_val=x[20:25],
             y_val=np.arange(5) % 2, x_test=x[25:], y_test=np.arange(5) % 2)
    cfg = from_dict(tiny_params(["data.source=npz", "data.path=mine.npz"]), root=tmp_path)
    meta = prepare(cfg.data, cfg.path("raw"), cfg.path("prepared"), cfg.root)
    assert meta["input_shape"] == [3, 5, 5] and meta["split_sizes"] == {
        "train": 20, "val": 5, "test": 5}
    with np.load(cfg.path("prepared") / "dataset.npz") as npz:
        assert np.array_equal(npz["x_val"], x[20:25].transpose(0, 3, 1, 2))


def test_source_records_change_with_the_weights_and_arrays_only(tmp_path: Path) -> None:
    """What DVC sees: the same files give the same records (nothing re-runs), new weights or
    new arrays change the one record that `pretrain` or `prepare` depends on."""
    from reduce_ops import sources

    pkg = tmp_path / "code" / "byo_src_net"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from torch import nn\ndef build():\n"
                                     "    return nn.Linear(4, 2)\n")
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 2, 2), np.uint8), y_train=np.arange(4))
    cfg = from_dict(tiny_params(["paths.code=code", "model.source=python",
                                 "model.factory=byo_src_net:build", "model.weights=w.pt",
                                 "data.source=npz", "data.path=d.npz"]), root=tmp_path)
    first = sources.fingerprints(cfg)
    assert sources.fingerprints(cfg) == first
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "w.pt")          # new weights
    second = sources.fingerprints(cfg)
    assert second[sources.MODEL_FILE] != first[sources.MODEL_FILE]
    assert second[sources.DATA_FILE] == first[sources.DATA_FILE]
    np.savez(tmp_path / "d.npz", x_train=np.ones((4, 2, 2), np.uint8), y_train=np.arange(4))
    assert sources.fingerprints(cfg)[sources.DATA_FILE] != first[sources.DATA_FILE]

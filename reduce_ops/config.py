"""Typed, validated parameters: params.yaml (plus command-line overrides) -> frozen dataclasses.

params.yaml is the single source of truth: the dataclasses below carry no defaults, so every key
must be present in the file and a key the code does not know is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from reduce_ops.errors import ConfigError
from reduce_ops.names import safe_name_problem

DEFAULT_PARAMS = "params.yaml"
MAX_SEED = 2**32 - 1       # every seed goes to numpy, torch and scikit-learn: the range they share
# keys of earlier params files, and where their value lives now
MOVED_KEYS = {
    "robustness.stuck_polarity": "stuck-at faults share one setting: hardware.stuck_at.polarity",
    "robustness.stuck_bits": "stuck-at faults share one setting: hardware.stuck_at.bits",
}


def _check(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, nonempty: bool = False,
           default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value (or every list item) must lie in [lo, hi]. `default` only
    serves objects built in code; params.yaml must still give every key."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open,
                                            "hi_open": hi_open, "nonempty": nonempty})


@dataclass(frozen=True)
class PathsConfig:
    """Where stages read and write, relative to the project root (the params file's folder)."""

    raw: str
    prepared: str
    fleet: str
    baseline: str
    variants: str
    results: str
    code: str | None        # a folder put on sys.path to import model.factory / data.function


@dataclass(frozen=True)
class DataConfig:
    """Dataset source and the seeded, stratified split."""

    source: Literal["mnist5k", "digits", "mnist", "fashion_mnist", "cifar10", "imagefolder",
                    "npz", "function"]
    download: bool
    val_fraction: float = _check(0.0, 0.5, lo_open=True)
    test_fraction: float = _check(0.0, 0.5, lo_open=True)
    seed: int = _check(0, MAX_SEED)
    image_size: int = _check(4, 512)      # imagefolder only: images are resized to this square
    grayscale: bool                       # imagefolder only: convert to one channel
    # a user's own data (every key is still required in params.yaml: the defaults are only for
    # code that builds a DataConfig by position)
    path: str | None = None       # npz: the file (x_train, y_train, optional x_val.., x_test..)
    function: str | None = None   # function: package.module:function returning the splits
    mean: list[float] | None = None   # per-channel normalisation of [0, 1] pixels that the
    std: list[float] | None = None    # model was trained with; null = the train split's own


@dataclass(frozen=True)
class ModelConfig:
    """The baseline: a zoo architecture that pretrain trains, or a trained network of the
    user's (an MLflow model URI, or a factory and its state_dict) that pretrain measures."""

    source: Literal["zoo", "mlflow", "python"]
    name: Literal["lenet", "lenet-bn", "mlp", "vgg11", "resnet18"]   # zoo
    uri: str | None               # mlflow: models:/name@alias | models:/name/N | runs:/id/path
    factory: str | None           # python: package.module:function returning the nn.Module
    weights: str | None           # python: its state_dict file, loaded with weights_only=True
    allow_pickle: bool            # mlflow: unpickle a model saved with pickle (runs its code)
    activation_threshold: float = _check(0.0, 100.0)   # ReLU -> x if x > t else 0 (0 = ReLU)


@dataclass(frozen=True)
class TrainConfig:
    """Baseline training: optimiser and the plateau stopping rule on a training holdout."""

    max_epochs: int = _check(1, 1000)
    early_stop_fraction: float = _check(0.0, 0.5, lo_open=True)   # of the training split,
                                                                  # held out for early stopping
    patience: int = _check(1, 1000)
    min_delta: float = _check(0.0, 1.0)
    batch_size: int = _check(1, 65536)
    optimizer: Literal["sgd", "adam"]
    lr: float = _check(0.0, 10.0, lo_open=True)
    momentum: float = _check(0.0, 1.0, hi_open=True)
    weight_decay: float = _check(0.0, 1.0)
    seed: int = _check(0, MAX_SEED)
    augment_shift: int = _check(0, 64)
    device: str
    sharpness: Literal["none", "sam", "saq"]     # plain steps | SAM | SAQ (int8 in the loop)
    rho: float = _check(0.0, 10.0)               # SAM / SAQ ascent radius (L2, all weights)


@dataclass(frozen=True)
class FlatnessConfig:
    """Flatness logged for every baseline: the mean loss increase under relative weight noise."""

    sigma: float = _check(0.0, 10.0, lo_open=True)   # noise std, relative to each |weight|
    draws: int = _check(1, 10000)
    n_images: int = _check(1)                       # training images the loss is measured on
    seed: int = _check(0, MAX_SEED)


@dataclass(frozen=True)
class VariantConfig:
    """One more baseline for `variants` / `robustness`: trained like the baseline (train.*) but
    with its own activation threshold and sharpness method."""

    name: str
    activation_threshold: float = _check(0.0, 100.0)
    sharpness: Literal["none", "sam", "saq"]
    rho: float = _check(0.0, 10.0)


@dataclass(frozen=True)
class StuckAtConfig:
    """Stuck-at bits, wherever they are (a faulty PE's weight register under fault_model
    stuck_at, the weight memory cells of `robustness`): which positions can stick, and what
    they stick at; n_bits is how many stick in one faulty PE's register."""

    bits: list[int] | None = _check(0, 7)          # positions that can stick; null = all 8
    n_bits: int = _check(1, 8)                     # stuck bits per faulty PE
    polarity: Literal["random", "zero", "one"]     # what they are stuck at


@dataclass(frozen=True)
class HardwareConfig:
    """Systolic-array geometry, which layer types run on it, and how a faulty PE fails."""

    rows: int = _check(1, 65536)
    cols: int = _check(1, 65536)
    layer_types: list[Literal["conv", "linear"]] = _check(nonempty=True)
    exclude_layers: list[str]     # module names (a container: all inside) that run elsewhere
    fault_model: Literal["bypass", "stuck_at"]     # weights act as zero | int8 with stuck bits
    stuck_at: StuckAtConfig


@dataclass(frozen=True)
class FaultMapsConfig:
    """The fleet: imported from a test floor's maps, or generated (how many chips, which defect
    model, which fault rates)."""

    source: Literal["generate", "import"]
    import_dir: str                       # the maps read when source is import (a DVC dep)
    n_chips: int = _check(1, 100000)
    generator: Literal["uniform", "clustered", "wafer"]
    chips_per_wafer: int = _check(1, 100000)      # wafer generator: chips cut from one wafer
    shared_fraction: float = _check(0.0, 1.0)     # wafer: share of a chip's faults that are the
                                                  # wafer's systematic defects
    rate_spread: float = _check(0.0, 1.0)         # wafer: chip rate = wafer rate +- this
    rate_distribution: Literal["uniform", "beta"]
    rate_min: float = _check(0.0, 1.0)
    rate_max: float = _check(0.0, 1.0)
    seed: int = _check(0, MAX_SEED)
    id_prefix: str


@dataclass(frozen=True)
class FatConfig:
    """Fault-aware training (resilience trials, per-chip retraining, comparisons)."""

    optimizer: Literal["sgd", "adam"]
    lr: float = _check(0.0, 10.0, lo_open=True)
    momentum: float = _check(0.0, 1.0, hi_open=True)
    weight_decay: float = _check(0.0, 1.0)
    batch_size: int = _check(1, 65536)
    seed: int = _check(0, MAX_SEED)


@dataclass(frozen=True)
class ResilienceConfig:
    """The trial grid: fault rates x repetitions, each FAT run up to max_epochs with checkpoints."""

    fault_rates: list[float] = _check(0.0, 1.0, nonempty=True)
    repetitions: int = _check(1, 1000)
    max_epochs: float = _check(0.0, 1000.0, lo_open=True)
    checkpoint_every: float = _check(0.0, 1000.0, lo_open=True)
    generator: Literal["uniform", "clustered"]
    seed: int = _check(0, MAX_SEED)
    accuracy_levels: list[float] = _check(0.0, 1.0)
    confirm_epochs: float = _check(0.0, 1000.0)   # a trial past the grid stops this long after
                                                  # its monotone fit reached the level


@dataclass(frozen=True)
class ConstraintConfig:
    """Accuracy every shipped chip model must reach: absolute, or a maximum drop from baseline."""

    kind: Literal["absolute", "drop"]
    value: float = _check(0.0, 1.0)


@dataclass(frozen=True)
class PlanConfig:
    """Step 2 of Reduce: how per-rate needs are aggregated and turned into per-chip epochs."""

    statistic: str                    # max | mean | qP (P in (0, 1]), checked by planning
    min_reached: float = _check(0.0, 1.0, lo_open=True)   # fraction of repetitions that must
                                                          # reach for a fault rate to be planned
    safety_margin: float = _check(1.0, 100.0)
    budget_cap: float = _check(0.0, 1000.0, lo_open=True)   # most epochs of FAT for one chip
    fleet_budget: float | None = _check(0.0, 1000.0)   # epochs per chip on average the plan
    # may give: chips beyond the edge are trained to the cap while it lasts; null = none
    resilience_run: str | None        # MLflow run id; null = the run the resilience stage wrote


@dataclass(frozen=True)
class VerifyConfig:
    """Every chip's model is checked on the validation split before it ships."""

    margin: float = _check(0.0, 1.0)              # ship at val accuracy - band >= level + margin
    step: float = _check(0.0, 1000.0, lo_open=True)   # a miss trains on in steps of this many
                                                      # epochs, up to plan.budget_cap
    escape_rate: float | None = _check(0.0, 0.5, lo_open=True, hi_open=True)   # the guard
    # band's risk: z(1 - escape_rate) standard errors of (validation - test); null = no band
    pool: int = _check(1, 10)     # a check reads the mean over this many checks a step apart


@dataclass(frozen=True)
class GroupConfig:
    """eFAT: chips whose fused fault map saves retraining share one FAT run."""

    enabled: bool
    max_size: int = _check(1, 100000)             # chips in one group at most
    candidates: int = _check(1, 100000)           # partners considered per chip
    sample_pes: int = _check(1, 1 << 30)          # PEs sampled to estimate map overlaps
    refine_rounds: int = _check(0, 1000)          # passes of single-chip moves after merging
    objective: Literal["planned", "expected"] = "planned"   # what grouping minimises


@dataclass(frozen=True)
class CompareConfig:
    """Policies compared on the fleet: fixed epochs for every chip vs Reduce plans."""

    fixed_epochs: list[float] = _check(0.0, 1000.0, lo_open=True, nonempty=True)
    statistics: list[str] = _check(nonempty=True)     # Reduce plans, one per statistic
    reference_margin: float | None = _check(-1.0, 1.0)   # a flat-margin Reduce kept beside
                                                         # the default rule; null = none


@dataclass(frozen=True)
class RobustnessConfig:
    """Accuracy of the int8 baseline under faults in its stored weight bits."""

    bers: list[float] = _check(0.0, 1.0, nonempty=True)          # bit error rates
    fault_models: list[Literal["bit_flip", "stuck_at"]] = _check(nonempty=True)
    repetitions: int = _check(1, 1000)
    seed: int = _check(0, MAX_SEED)                         # fault seed, apart from every other seed


@dataclass(frozen=True)
class RegistryConfig:
    """MLflow Model Registry names: one registered model per chip, <prefix>-<chip_id>."""

    prefix: str


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow experiment used when a stage is not launched by `mlflow run`."""

    experiment: str


@dataclass(frozen=True)
class ExecutionConfig:
    """Where the independent units of work (resilience trials, chips, groups) run: on this
    machine (in this process with one worker, else a pool of `workers` processes), or as Ray
    tasks on `workers` CPUs of a local Ray instance or of a cluster."""

    backend: Literal["local", "ray"]
    address: str | None            # Ray: null = start a local instance; auto | ray://host:port
    workers: int = _check(1, 100000)   # params may say `auto`: auto_workers()
    torch_threads: int = _check(0, 1024)   # per process (0 = torch's default)
    batch: int = _check(1, 1024, default=1)   # chips / trials trained as one computation
                                              # (reduce_ops.batched); 1 = one by one


@dataclass(frozen=True)
class Config:
    """All parameters of one pipeline run, plus where they came from."""

    paths: PathsConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    hardware: HardwareConfig
    faultmaps: FaultMapsConfig
    fat: FatConfig
    resilience: ResilienceConfig
    constraint: ConstraintConfig
    plan: PlanConfig
    verify: VerifyConfig
    group: GroupConfig
    compare: CompareConfig
    robustness: RobustnessConfig
    flatness: FlatnessConfig
    variants: list[VariantConfig]
    registry: RegistryConfig
    tracking: TrackingConfig
    execution: ExecutionConfig
    root: Path = field(default=Path("."), compare=False)
    source: str = field(default=DEFAULT_PARAMS, compare=False)

    def path(self, name: str) -> Path:
        """Absolute path of `paths.<name>` under the project root."""
        return self.root / getattr(self.paths, name)

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a nested dict, as params.yaml spells them."""
        out = dataclasses.asdict(self)
        out.pop("root")
        out.pop("source")
        return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the key names used on the command line and in MLflow."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------- building + checks

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _convert(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check `value` against the type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_txt = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: {key}: expected one of {', '.join(map(str, choices))}, "
                              f"got {value!r}{hint_txt}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {_type_name(value)} {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_convert(v, item_hint, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: expected a number, got {_type_name(value)} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key}: expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported type hint {hint!r} for {key}")  # a bug in this module


def _range_check(value: Any, meta: Any, key: str, where: str) -> None:
    if meta.get("nonempty") and isinstance(value, list) and not value:
        raise ConfigError(f"{where}: {key}: must not be empty")
    lo, hi = meta.get("lo"), meta.get("hi")
    items = ([(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list)
             else [(key, value)])
    for name, v in items:
        if not isinstance(v, (int, float)):
            continue
        if lo is not None and (v <= lo if meta["lo_open"] else v < lo):
            raise ConfigError(f"{where}: {name}: must be {'>' if meta['lo_open'] else '>='} "
                              f"{lo}, got {v}")
        if hi is not None and (v >= hi if meta["hi_open"] else v > hi):
            raise ConfigError(f"{where}: {name}: must be {'<' if meta['hi_open'] else '<='} "
                              f"{hi}, got {v}")


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, naming the exact key on any problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'}: expected a mapping, "
                          f"got {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.compare}
    for key in data:
        if key not in fields:
            moved = MOVED_KEYS.get(f"{prefix}{key}")
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint_txt = (f" ({moved})" if moved else
                        f" (did you mean '{prefix}{close[0]}'?)" if close else "")
            raise ConfigError(f"{where}: {prefix}{key}: unknown key{hint_txt}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            raise ConfigError(f"{where}: {key}: missing key")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], key + ".", where)
            continue
        value = _convert(data[name], hint, key, where)
        _range_check(value, f.metadata, key, where)
        kwargs[name] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config, where: str) -> None:
    """Constraints between keys that a single field cannot express."""
    if cfg.data.val_fraction + cfg.data.test_fraction >= 0.9:
        raise ConfigError(f"{where}: data.val_fraction + data.test_fraction must be < 0.9, got "
                          f"{cfg.data.val_fraction + cfg.data.test_fraction:g}")
    stuck = cfg.hardware.stuck_at
    bits = stuck.bits if stuck.bits is not None else list(range(8))
    if len(set(bits)) != len(bits) or not bits:
        raise ConfigError(f"{where}: hardware.stuck_at.bits: distinct bit positions 0..7, "
                          f"got {stuck.bits}")
    if stuck.n_bits > len(bits):
        raise ConfigError(f"{where}: hardware.stuck_at.n_bits ({stuck.n_bits}) must be <= the "
                          f"{len(bits)} positions in hardware.stuck_at.bits")
    if cfg.hardware.fault_model == "stuck_at" and cfg.group.enabled:
        raise ConfigError(f"{where}: group.enabled: eFAT fuses bypassed PEs (a union of zeroed "
                          f"weights); with hardware.fault_model: stuck_at set group.enabled: "
                          f"false")
    fm = cfg.faultmaps
    if fm.source == "generate" and fm.generator == "wafer" and fm.n_chips % fm.chips_per_wafer:
        raise ConfigError(f"{where}: faultmaps.chips_per_wafer ({fm.chips_per_wafer}) must "
                          f"divide faultmaps.n_chips ({fm.n_chips})")
    if cfg.faultmaps.rate_min > cfg.faultmaps.rate_max:
        raise ConfigError(f"{where}: faultmaps.rate_min ({cfg.faultmaps.rate_min:g}) must be <= "
                          f"faultmaps.rate_max ({cfg.faultmaps.rate_max:g})")
    res = cfg.resilience
    if res.checkpoint_every > res.max_epochs:
        raise ConfigError(f"{where}: resilience.checkpoint_every ({res.checkpoint_every:g}) must "
                          f"be <= resilience.max_epochs ({res.max_epochs:g})")
    if cfg.plan.budget_cap < res.max_epochs:
        raise ConfigError(f"{where}: plan.budget_cap ({cfg.plan.budget_cap:g}) must be >= "
                          f"resilience.max_epochs ({res.max_epochs:g}): trials run at least "
                          f"that far")
    if len(set(res.fault_rates)) != len(res.fault_rates):
        raise ConfigError(f"{where}: resilience.fault_rates: duplicate rates in {res.fault_rates}")
    from reduce_ops.statistic import parse_statistic

    for key, stat in [("plan.statistic", cfg.plan.statistic),
                      *((f"compare.statistics[{i}]", v)
                        for i, v in enumerate(cfg.compare.statistics))]:
        try:
            parse_statistic(stat)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {key}: {str(exc).split(': ', 1)[1]}") from None
    problem = safe_name_problem(cfg.registry.prefix)
    if problem:
        raise ConfigError(f"{where}: registry.prefix: {problem}")
    seen: set[str] = set()
    for i, variant in enumerate(cfg.variants):
        problem = safe_name_problem(variant.name)
        if problem or variant.name == "baseline" or variant.name in seen:
            why = problem or ("'baseline' names the pipeline's own baseline"
                              if variant.name == "baseline" else "a name used twice")
            raise ConfigError(f"{where}: variants[{i}].name: {why}")
        seen.add(variant.name)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]{1,3})?", cfg.train.device):
        raise ConfigError(f"{where}: train.device: expected auto, cpu, cuda[:N] or mps, "
                          f"got {cfg.train.device!r}")
    _check_paths(cfg, where)


# Output folders that a stage replaces as a whole (an atomic swap), and the record folders under
# paths.results that are replaced the same way.
REPLACED_PATHS = ("prepared", "fleet", "variants")
REPLACED_RECORDS = ("plan", "group", "fat")


def _check_paths(cfg: Config, where: str) -> None:
    """No folder that a stage replaces as a whole may be the project folder, hold it, or hold
    (or be) another configured path: replacing it would delete what is there."""
    def place(text: str) -> Path:
        return (cfg.root / text).resolve()

    named = {f"paths.{k}": place(getattr(cfg.paths, k)) for k in
             ("raw", "prepared", "fleet", "baseline", "variants", "results")}
    named["faultmaps.import_dir"] = place(cfg.faultmaps.import_dir)
    named["the params file"] = place(where) if Path(where).name else cfg.root
    if named["paths.baseline"].is_dir():
        raise ConfigError(f"{where}: paths.baseline: {named['paths.baseline']} is a folder; it "
                          f"names the model file that pretrain writes (e.g. models/baseline.pt)")
    replaced = {k: named[f"paths.{k}"] for k in REPLACED_PATHS}
    replaced.update({f"results/{r}": named["paths.results"] / r for r in REPLACED_RECORDS})
    for name, out in replaced.items():
        key = (f"paths.{name}" if name in REPLACED_PATHS
               else f"paths.results' {name.split('/')[1]}/ folder")
        if out == cfg.root or out in cfg.root.parents:
            raise ConfigError(f"{where}: {key}: {getattr(cfg.paths, name, name)!r} is the "
                              f"project folder or holds it; a stage replaces this folder as a "
                              f"whole: give it a folder of its own (e.g. data/{name})")
        for other, path in named.items():
            if other == key or (name.startswith("results/") and other == "paths.results"):
                continue
            if path == out or out in path.parents:
                how = "is" if path == out else "holds"
                raise ConfigError(f"{where}: {key} ({out}) {how} {other} ({path}); a stage "
                                  f"replaces {key} as a whole: give it a folder of its own")


# Model URIs that name one model (resolved to a pinned version when pretrain reads it).
MODEL_URI = re.compile(r"models:/[^/@]+@[^/@]+|models:/[^/@]+/[0-9]+|models:/m-[0-9a-f]+"
                       r"|runs:/[0-9a-f]+/.+")
IMPORT_SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


def _source_checks(cfg: Config, where: str) -> None:
    """Which keys the model and data sources need, and that the others stay null."""
    m, d = cfg.model, cfg.data
    needs = {"zoo": (), "mlflow": ("uri",), "python": ("factory", "weights")}
    for section, source, keys, need in (
            ("model", m.source, ("uri", "factory", "weights"), needs[m.source]),
            ("data", d.source, ("path", "function"),
             {"npz": ("path",), "function": ("function",)}.get(d.source, ()))):
        obj = m if section == "model" else d
        for key in keys:
            given = getattr(obj, key) is not None
            if key in need and not given:
                raise ConfigError(f"{where}: {section}.{key}: needed by {section}.source "
                                  f"{source}")
            if key not in need and given:
                raise ConfigError(f"{where}: {section}.{key}: set, but {section}.source is "
                                  f"{source}; set it to null (or change {section}.source)")
    if m.uri is not None and not MODEL_URI.fullmatch(m.uri):
        raise ConfigError(f"{where}: model.uri: expected models:/<name>@<alias>, "
                          f"models:/<name>/<version> or runs:/<run id>/<path>, got {m.uri!r}")
    for key, spec in (("model.factory", m.factory), ("data.function", d.function)):
        if spec is not None and not IMPORT_SPEC.fullmatch(spec):
            raise ConfigError(f"{where}: {key}: expected package.module:function, got {spec!r}")
    if m.source != "zoo":
        if m.activation_threshold > 0:
            raise ConfigError(f"{where}: model.activation_threshold: thresholds a zoo model "
                              f"that pretrain trains; with model.source {m.source} set it to 0")
        if cfg.variants:
            raise ConfigError(f"{where}: variants: are trained from scratch, for model.source "
                              f"zoo only; with model.source {m.source} set variants: []")
    if (d.mean is None) != (d.std is None) or (d.mean is not None and len(d.mean) != len(d.std)):
        raise ConfigError(f"{where}: data.mean and data.std: both null, or lists of one value "
                          f"per channel, got {d.mean} and {d.std}")
    if d.std is not None and not all(v > 0 for v in d.std):
        raise ConfigError(f"{where}: data.std: every value must be > 0, got {d.std}")
    if len(set(cfg.hardware.exclude_layers)) != len(cfg.hardware.exclude_layers):
        raise ConfigError(f"{where}: hardware.exclude_layers: a name listed twice in "
                          f"{cfg.hardware.exclude_layers}")


# --------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=0.1' -> ('train.lr', 0.1); the value is read as YAML, so lists work: a=[1,2]."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.max_epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: cannot read value {raw!r}") from None
    return key, value


def split_overrides(text: str) -> list[str]:
    """Split the MLproject `overrides` string ('a.b=1 c.d=[1, 2]') into KEY=VALUE items."""
    items: list[str] = []
    depth = 0
    current = ""
    for ch in text.strip():
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch.isspace() and depth == 0:
            if current:
                items.append(current)
            current = ""
        elif ch == "," and depth == 0 and "=" in current:
            items.append(current)
            current = ""
        else:
            current += ch
    if current:
        items.append(current)
    return items


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each KEY=VALUE set; unknown keys fail later, when built."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key}: unknown key '{part}'")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {key}: unknown key")
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- loading

def read_params_text(path: Path) -> str:
    """The params file's text (UTF-8), or one ConfigError line: missing, unreadable, not
    text."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a params file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (the last would win
    silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue                 # `<<: *base` may be overridden by the keys beside it
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:            # an unhashable key: the base class says so
                break
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key, first, again)
        self.key, self.first, self.again = key, first, again


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a params file as a mapping, with a one-line error for a missing or broken file."""
    text = read_params_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)     # a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ConfigError(f"{path}: line {dup.again}: key {dup.key!r} given twice (also on "
                          f"line {dup.first}); keep one") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{loc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


WORKER_BYTES = 2**30       # a pool worker: ~0.5 GB private (torch's import alone ~0.3 GB) and room


def cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_workers() -> int:
    """What `execution.workers: auto` resolves to: the cores, at most one worker per GiB of
    the memory available now (Linux' MemAvailable; the cores where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return cores()
    return max(1, min(cores(), kib * 1024 // WORKER_BYTES))


def _auto_workers(raw: Any) -> Any:
    """`execution.workers: auto` as a number (auto_workers). Each unit then runs at one torch
    thread however many workers that makes (torch_threads 0 -> 1 where it is one), so that
    `auto` gives the same results on a machine whatever its cores or free memory."""
    exe = raw.get("execution") if isinstance(raw, dict) else None
    if not isinstance(exe, dict) or exe.get("workers") != "auto":
        return raw
    workers = auto_workers()
    threads = exe.get("torch_threads")
    if workers == 1 and threads == 0:
        threads = 1
    return {**raw, "execution": {**exe, "workers": workers, "torch_threads": threads}}


def from_dict(raw: dict[str, Any], root: Path = Path("."), where: str = DEFAULT_PARAMS) -> Config:
    """Build and validate a Config from a nested dict."""
    cfg = _build(Config, _auto_workers(raw), "", where)
    cfg = dataclasses.replace(cfg, root=Path(root).resolve(), source=where)
    _cross_checks(cfg, where)
    _source_checks(cfg, where)
    return cfg


def set_params(path: Path, values: dict[str, Any]) -> None:
    """Write `values` ({'section.key': value}) into the params file, keeping its comments and
    layout (a round-trip YAML edit, written atomically); the result must still validate."""
    write_params(path, edited_params(path, values))


def write_params(path: Path, text: str) -> None:
    """Replace the params file by `text` (from edited_params) atomically."""
    from reduce_ops.atomic import write_file

    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def edited_params(path: Path, values: dict[str, Any]) -> str:
    """The params file's text with `values` ({'section.key': value}) set, comments and layout
    kept (a round-trip YAML edit), checked to still validate; nothing is written."""
    import io

    from ruamel.yaml import YAML

    doc_yaml = YAML()
    doc_yaml.preserve_quotes = True
    doc = doc_yaml.load(read_params_text(path))
    for key, value in values.items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{path}: {key}: unknown key")
        node[leaf] = value
    buffer = io.StringIO()
    doc_yaml.dump(doc, buffer)
    text = buffer.getvalue()
    from_dict(yaml.safe_load(text), root=path.resolve().parent, where=str(path))  # still valid
    return text


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Config:
    """Load params.yaml, apply KEY=VALUE overrides, validate; the root is the file's folder."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    return from_dict(raw, root=path.resolve().parent, where=str(path))

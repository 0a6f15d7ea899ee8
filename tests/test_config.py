"""params.yaml -> typed config: validation errors name the key; overrides reach every key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_params

from reduce_ops.cli import main
from reduce_ops.config import (
    apply_overrides,
    auto_workers,
    flatten,
    from_dict,
    load_config,
    read_yaml,
    split_overrides,
)
from reduce_ops.errors import ConfigError


def test_repository_params_load_and_resolve_paths() -> None:
    cfg = load_config(REPO / "params.yaml")
    assert cfg.root == REPO
    assert cfg.path("baseline") == REPO / cfg.paths.baseline
    assert cfg.hardware.rows == 256 and cfg.hardware.cols == 256
    # Every leaf of the file is a config field and comes back unchanged (workers: auto as
    # the number it resolves to here).
    raw = flatten(read_yaml(REPO / "params.yaml"))
    assert raw["execution.workers"] == "auto"
    raw["execution.workers"] = auto_workers()
    if raw["execution.workers"] == 1:
        raw["execution.torch_threads"] = 1
    assert flatten(cfg.to_dict()) == raw


@pytest.mark.parametrize("override, message", [
    ("train.lr=-0.1", "train.lr: must be > 0.0, got -0.1"),
    ("train.max_epochs=2.5", "train.max_epochs: expected an integer, got float 2.5"),
    ("train.max_epochs=true", "train.max_epochs: expected an integer, got bool True"),
    ("data.source=mnist6k", "data.source: expected one of"),
    ("data.download=yes please", "data.download: expected true or false"),
    ("model.name=vgg16",
     "model.name: expected one of lenet, lenet-bn, mlp, vgg11, resnet18, got 'vgg16'"),
    ("hardware.layer_types=[conv, attention]", "hardware.layer_types[1]: expected one of"),
    ("hardware.layer_types=[]", "hardware.layer_types: must not be empty"),
    ("hardware.rows=0", "hardware.rows: must be >= 1, got 0"),
    ("faultmaps.rate_max=1.5", "faultmaps.rate_max: must be <= 1.0, got 1.5"),
    ("plan.fleet_budget=-1", "plan.fleet_budget: must be >= 0.0, got -1"),
    ("train.device=tpu", "train.device: expected auto, cpu, cuda[:N] or mps"),
])
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        from_dict(apply_overrides(tiny_params(), [override]))


def test_unknown_and_missing_keys(tmp_path: Path) -> None:
    raw = tiny_params()
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown key"):
        from_dict(raw)
    raw = tiny_params()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        from_dict(raw)
    raw = tiny_params()
    del raw["train"]["patience"]
    with pytest.raises(ConfigError, match=r"train\.patience: missing key"):
        from_dict(raw)


def test_a_key_of_an_earlier_params_file_says_where_it_lives_now() -> None:
    """The stuck-at settings were spelled twice (hardware.stuck_at and robustness.stuck_*)."""
    raw = tiny_params()
    raw["robustness"]["stuck_polarity"] = "zero"
    with pytest.raises(ConfigError, match=r"robustness\.stuck_polarity: unknown key \(stuck-at "
                                          r"faults share one setting: hardware\.stuck_at\.polarity"):
        from_dict(raw)


def test_cross_key_checks() -> None:
    with pytest.raises(ConfigError, match="faultmaps.rate_min .* must be <= faultmaps.rate_max"):
        from_dict(apply_overrides(tiny_params(), ["faultmaps.rate_min=0.4",
                                                  "faultmaps.rate_max=0.2"]))


def test_a_budget_cap_below_the_grid_is_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    for stage in ("resilience", "plan", "fat"):
        assert main([stage, "--params", str(params), "--set", "resilience.max_epochs=4",
                     "--set", "plan.budget_cap=2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [f"reduce-ops {stage}: error: {params}: plan.budget_cap (2) "
                                    f"must be >= resilience.max_epochs (4): trials run at "
                                    f"least that far"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_overrides_reach_nested_keys_and_parse_yaml_values() -> None:
    cfg = from_dict(apply_overrides(tiny_params(), ["train.lr=0.5", "hardware.layer_types=[conv]",
                                                    "data.download=true"]))
    assert cfg.train.lr == 0.5 and cfg.hardware.layer_types == ["conv"] and cfg.data.download
    with pytest.raises(ConfigError, match="override train.nope: unknown key"):
        apply_overrides(tiny_params(), ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(tiny_params(), ["train.lr"])


def test_split_overrides_keeps_lists_together() -> None:
    assert split_overrides("a.b=1  c.d=[1, 2, 3] e=x") == ["a.b=1", "c.d=[1, 2, 3]", "e=x"]
    assert split_overrides("a.b=1,c.d=2") == ["a.b=1", "c.d=2"]
    assert split_overrides("") == []


def test_broken_params_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))
    code = main(["pretrain", "--params", str(params), "--set", "train.batch_size=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "train.batch_size: must be >= 1, got 0" in err and "Traceback" not in err
    # A stage whose input is missing says what to run, and writes nothing.
    code = main(["pretrain", "--params", str(params)])
    err = capsys.readouterr().err
    assert code == 2 and "run `reduce-ops prepare` first" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_paper_params_file_is_valid() -> None:
    cfg = load_config(REPO / "params-paper.yaml")
    assert (cfg.data.source, cfg.model.name) == ("cifar10", "vgg11")
    assert (cfg.hardware.rows, cfg.hardware.cols) == (256, 256)
    assert (cfg.constraint.kind, cfg.constraint.value) == ("absolute", 0.91)
    # Same keys as params.yaml: nothing the default pipeline has is missing here.
    assert set(flatten(cfg.to_dict())) == set(flatten(read_yaml(REPO / "params.yaml")))
    assert cfg.path("results") != load_config(REPO / "params.yaml").path("results")

"""`reduce-ops variants` trains the configured baselines beside the baseline; `robustness` puts
every one of them under the same faults: a child run per variant and trial, one curve each."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY_BER, clone_project, make_project, run_stages

from reduce_ops.cli import main
from reduce_ops.models import ThresholdReLU, load_checkpoint
from reduce_ops.tracking.runs import find_runs, read_children
from reduce_ops.tracking.store import tracking_uri

VARIANTS = ("variants=[{name: sparse-plain, activation_threshold: 0.5, sharpness: none, rho: 0},"
            " {name: dense-saq, activation_threshold: 0, sharpness: saq, rho: 0.05}]")
GRID = [*TINY_BER, "robustness.bers=[0.0, 0.01]", VARIANTS]


@pytest.fixture(scope="module")
def project(tiny_pipeline) -> Path:
    return tiny_pipeline("variants", GRID, ["prepare", "pretrain", "variants", "robustness"])


def test_variants_are_trained_measured_and_logged(project: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    table = pd.read_csv(project / "results/variants/summary.csv")
    assert list(table["variant"]) == ["sparse-plain", "dense-saq"]
    assert list(table["sharpness"]) == ["none", "saq"]
    assert table["flatness_loss_increase"].notna().all()
    base = json.loads((project / "results/pretrain/metrics.json").read_text())
    assert 0 < base["activation_sparsity"] < 1 and "flatness_loss_increase" in base
    sparse = table.set_index("variant").loc["sparse-plain"]
    assert sparse["activation_sparsity"] > base["activation_sparsity"]
    model, ckpt = load_checkpoint(project / "models/variants/sparse-plain.pt")
    assert any(isinstance(m, ThresholdReLU) and m.threshold == 0.5 for m in model.modules())
    assert ckpt["info"]["sharpness"] == "none"
    (parent,) = find_runs(tracking_uri(project), {"reduce_ops.stage": "variants"})
    children = read_children(tracking_uri(project), parent.run_id,
                             ["holdout_accuracy", "test_accuracy"])
    assert sorted(c["params"]["variant"] for c in children) == ["dense-saq", "sparse-plain"]
    for child in children:
        assert len(child["histories"]["holdout_accuracy"]) >= 1


def test_robustness_puts_every_variant_under_the_same_faults(project: Path,
                                                              monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = project / "results/robustness"
    trials = pd.read_csv(out / "trials.csv")
    assert set(trials["variant"]) == {"baseline", "sparse-plain", "dense-saq"}
    per_trial = trials.groupby(["fault_model", "ber", "repetition"])
    assert (per_trial["seed"].nunique() == 1).all()                 # one draw per trial ...
    assert (per_trial["faulty_bits"].nunique() == 1).all()          # ... shared (same shapes)
    assert (per_trial["variant"].count() == 3).all()
    by_variant = pd.read_csv(out / "variants.csv")
    assert list(by_variant["variant"]) == ["baseline", "sparse-plain", "dense-saq"]
    assert {"bit_flip@1e-02", "stuck_at@1e-02", "activation_sparsity",
            "flatness_loss_increase", "int8_accuracy"} <= set(by_variant.columns)
    clean = trials[trials["ber"] == 0.0].groupby("variant")["accuracy"].first()
    for row in by_variant.itertuples(index=False):
        assert clean[row.variant] == pytest.approx(row.int8_accuracy)
    summary = json.loads((out / "summary.json").read_text())
    children = read_children(tracking_uri(project), summary["run_id"], ["accuracy"])
    assert len(children) == len(trials) == 3 * 2 * 2 * 2
    assert (out / "accuracy_vs_ber.png").read_bytes()[:4] == b"\x89PNG"


def test_a_variant_trained_with_other_settings_is_refused(project: Path, tmp_path: Path,
                                                          capsys) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["variants"][1]["rho"] = 0.1
    changed = tmp_path / "params.yaml"
    # another folder, the trained project's files
    for key in ("prepared", "baseline", "variants", "results"):
        params["paths"][key] = str(project / params["paths"][key])
    changed.write_text(yaml.safe_dump(params, sort_keys=False))
    assert main(["robustness", "--params", str(changed)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dense-saq.pt" in err and "variants" in err


def test_a_missing_variant_model_is_one_line(tmp_path: Path, capsys) -> None:
    params = make_project(tmp_path, [VARIANTS, "train.max_epochs=1"])
    run_stages(tmp_path, "prepare", "pretrain")
    capsys.readouterr()
    assert main(["robustness", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reduce-ops variants" in err
    assert not (tmp_path / "results/robustness").exists()


def test_variants_in_the_pool_are_those_of_one_worker(project: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two worker processes train the variants (logged in the driver, in params order): the
    same models, to the bit, as one worker at one torch thread."""
    out = {}
    for name, sets in (("one", ["execution.workers=1", "execution.torch_threads=1"]),
                       ("pool", ["execution.workers=2", "execution.torch_threads=0"])):
        root = clone_project(project, tmp_path / name, sets)
        monkeypatch.chdir(root)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["variants", "--params", str(root / "params.yaml")]) == 0
        out[name] = pd.read_csv(root / "results/variants/summary.csv").drop(
            columns=["train_seconds"])
    assert list(out["pool"]["variant"]) == ["sparse-plain", "dense-saq"]
    pd.testing.assert_frame_equal(out["one"], out["pool"])

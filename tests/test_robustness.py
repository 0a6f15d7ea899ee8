"""`reduce-ops robustness`: the int8 baseline under bit flips and stuck-at cells over a BER grid,
every trial an MLflow child run, the tables agreeing with MLflow, BER 0 the clean int8 model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_BER, make_project

from reduce_ops import robustness
from reduce_ops.cli import main
from reduce_ops.config import ExecutionConfig
from reduce_ops.models import build_model
from reduce_ops.tracking.runs import find_runs, read_children
from reduce_ops.tracking.store import tracking_uri

GRID = [*TINY_BER, "robustness.bers=[0.0, 0.001, 0.05]"]


@pytest.fixture(scope="module")
def project(tiny_pipeline) -> Path:
    return tiny_pipeline("robust", GRID, ["prepare", "pretrain", "robustness"])


def test_trials_are_child_runs_and_the_tables_agree(project: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = project / "results/robustness"
    trials = pd.read_csv(out / "trials.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert len(trials) == 2 * 3 * 2                       # fault models x BERs x repetitions
    children = read_children(tracking_uri(project), summary["run_id"], ["accuracy"])
    assert len(children) == len(trials)
    logged = sorted((c["params"]["fault_model"], float(c["params"]["ber"]),
                     int(c["params"]["repetition"]), c["histories"]["accuracy"][0][1])
                    for c in children)
    assert logged == sorted(zip(trials["fault_model"], trials["ber"], trials["repetition"],
                                trials["accuracy"]))
    # no faults: exactly the clean int8 model, no faulty bits
    clean = trials[trials["ber"] == 0.0]
    assert (clean["accuracy"] == summary["int8_accuracy"]).all()
    assert (clean["faulty_bits"] == 0).all()
    # faulty bits scale with the BER; heavy bit flips cost accuracy
    flips = trials[trials["fault_model"] == "bit_flip"].groupby("ber")
    assert flips["faulty_bits"].mean().is_monotonic_increasing
    assert flips["accuracy"].mean()[0.05] < summary["int8_accuracy"] - 0.1
    table = pd.read_csv(out / "summary.csv")
    assert set(table["fault_model"]) == {"bit_flip", "stuck_at"} and (table["n"] == 2).all()
    assert (out / "accuracy_vs_ber.png").read_bytes()[:4] == b"\x89PNG"
    assert abs(summary["float_accuracy"] - summary["int8_accuracy"]) < 0.02
    assert find_runs(tracking_uri(project), {"reduce_ops.stage": "robustness"})


def test_variants_of_one_architecture_get_the_same_faults(prepared_digits) -> None:
    torch.manual_seed(0)
    a = build_model("lenet", prepared_digits.input_shape, 10)
    b = build_model("lenet", prepared_digits.input_shape, 10)
    specs = robustness.trial_grid(["bit_flip"], [0.01], 2, seed=3)
    got = robustness.run_trials({"a": a, "b": b}, prepared_digits.x["test"],
                                prepared_digits.y["test"], specs, ["conv", "linear"])
    bits = got.pivot(index="repetition", columns="variant", values="faulty_bits")
    assert (bits["a"] == bits["b"]).all() and bits["a"].iloc[0] != bits["a"].iloc[1]
    again = robustness.run_trials({"a": a}, prepared_digits.x["test"],
                                  prepared_digits.y["test"], specs, ["conv", "linear"])
    assert again["accuracy"].tolist() == got[got["variant"] == "a"]["accuracy"].tolist()


def test_a_ber_outside_zero_one_is_one_line(tmp_path: Path, capsys) -> None:
    params = make_project(tmp_path / "p")
    assert main(["robustness", "--params", str(params), "--set",
                 "robustness.bers=[0.001, 1.5]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "robustness.bers[1]: must be <= 1.0, got 1.5" in err[0]


def test_the_pool_gives_the_trials_one_worker_gives(prepared_digits, one_torch_thread) -> None:
    """Trials on two worker processes: the same rows, in trial order, as one worker at one
    thread, to the bit."""
    torch.manual_seed(0)
    models = {"a": build_model("lenet", prepared_digits.input_shape, 10),
              "b": build_model("mlp", prepared_digits.input_shape, 10)}
    specs = robustness.trial_grid(["bit_flip", "stuck_at"], [0.001, 0.01], 2, seed=3)
    x, y = prepared_digits.x["test"], prepared_digits.y["test"]
    seen: list[str] = []
    one = robustness.run_trials(models, x, y, specs, ["conv", "linear"],
                                exe=ExecutionConfig("local", None, 1, 1))
    pool = robustness.run_trials(models, x, y, specs, ["conv", "linear"],
                                 on_trial=lambda v, spec, *_: seen.append(f"{v} {spec.key}"),
                                 exe=ExecutionConfig("local", None, 2, 0))
    assert len(one) == 2 * len(specs) and len(seen) == len(one)
    pd.testing.assert_frame_equal(one, pool)

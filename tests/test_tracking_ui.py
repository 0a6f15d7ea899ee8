"""What a person browsing the MLflow UI of a tiny pipeline sees: one run per stage in the
pipeline's experiment (the first page of the address `reduce-ops ui` prints), each stage's many
runs in an experiment of their own that its description links to, verdicts in run names and
descriptions, runs that span their work, registered versions linked to their logged models, no
tooling files among the artifacts; then the same in a real headless browser (the distribution's
Chromium, driven by Selenium through its chromedriver)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    TINY_BER,
    WAFER_FLEET,
    clone_project,
    free_port,
    make_every_check_miss,
    start_ui,
    wait_until_healthy,
)

from reduce_ops import names
from reduce_ops.records import trials as trials_record
from reduce_ops.records.trials import TrialResult, TrialSpec
from reduce_ops.stages import PIPELINE

# The wafer fleet (8 chips, eFAT groups) with trials up to fault rate 0.2: the chips of the
# wafer above it are rejected by the plan, the others ship, some in one eFAT group.
SETUP = [*WAFER_FLEET, *TINY_BER, "resilience.fault_rates=[0.0, 0.1, 0.2]"]
EXPERIMENT, PREFIX = "reduce-ops", "reduce-ops"      # params.yaml's tracking / registry
LOGGED_STAGES = [s for s in PIPELINE if s not in ("prepare", "faultmaps")]   # DVC keeps those
KINDS = {"resilience": "resilience trials", "fat": "chips", "compare": "policies",
         "variants": "variants", "robustness": "bit-fault trials"}


@pytest.fixture(scope="module")
def project(tiny_pipeline) -> Path:
    """Every stage of the pipeline run on the tiny wafer fleet (tests only read it)."""
    return tiny_pipeline("ui", SETUP, PIPELINE)


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _stage_runs(client) -> dict[str, object]:
    """{stage: its newest run}."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    newest: dict[str, object] = {}
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        newest.setdefault(run.data.tags[names.TAG_STAGE], run)
    return newest


def _chip_runs(client) -> list:
    fat = _stage_runs(client)["fat"]
    return client.search_runs([fat.data.tags[names.TAG_CHILDREN_EXPERIMENT]],
                              f"tags.`{names.TAG_PARENT}` = '{fat.info.run_id}'")


def _description(run) -> str:
    return run.data.tags.get("mlflow.note.content", "")


# --------------------------------------------------------------------------- the layout

def test_the_pipeline_experiment_holds_one_run_per_stage_and_links_the_others(
        project: Path) -> None:
    client = _client(project)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags[names.TAG_STAGE] for r in runs) == sorted(LOGGED_STAGES)
    stages = _stage_runs(client)
    for stage, kind in KINDS.items():
        run = stages[stage]
        child_exp = run.data.tags[names.TAG_CHILDREN_EXPERIMENT]
        assert client.get_experiment(child_exp).name == f"{EXPERIMENT}/{kind}"
        children = client.search_runs([child_exp])
        assert all(c.data.tags[names.TAG_PARENT] == run.info.run_id for c in children)
        assert len(children) > 0 or stage == "variants"        # tiny params train none
        # the description links them: their experiment, searched for this run's children
        link = re.search(r"\]\((#/experiments/(\d+)/runs\?searchFilter=([^&)]+)&[^)]*)\)",
                         _description(run))
        assert link and link.group(2) == child_exp
        assert run.info.run_id in urllib.request.unquote(link.group(3))
    # logged models sit beside their runs, none in MLflow's Default experiment
    assert list(client.search_logged_models(["0"])) == []
    assert list(client.search_runs(["0"])) == []


def test_stage_runs_log_no_hidden_files(project: Path) -> None:
    client = _client(project)

    def files(run_id: str, path: str = "") -> list[str]:
        out = []
        for f in client.list_artifacts(run_id, path or None):
            out += files(run_id, f.path) if f.is_dir else [f.path]
        return out

    for stage, run in _stage_runs(client).items():
        logged = files(run.info.run_id)
        assert logged or stage == "variants", stage
        assert not [f for f in logged if any(p.startswith(".") for p in f.split("/"))], stage


def test_log_artifacts_leaves_out_what_tools_put_in_a_folder(tmp_path: Path) -> None:
    """DVC's .gitignore and other hidden files stay out; sub-folders keep their place."""
    from mlflow.tracking import MlflowClient

    from reduce_ops.tracking.runs import StageRun

    out = tmp_path / "results"
    (out / "sub" / ".cache").mkdir(parents=True)
    for rel in (".gitignore", "a.csv", "sub/b.txt", "sub/.hidden", "sub/.cache/c.txt"):
        (out / rel).write_text(rel)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp)
    StageRun(run.info.run_id, exp, uri, client).log_artifacts(out, "results")
    top = {f.path for f in client.list_artifacts(run.info.run_id, "results")}
    sub = {f.path for f in client.list_artifacts(run.info.run_id, "results/sub")}
    assert top == {"results/a.csv", "results/sub"} and sub == {"results/sub/b.txt"}


# --------------------------------------------------------------------------- verdicts

def test_a_chip_run_says_its_verdict_and_links_its_model(project: Path) -> None:
    client = _client(project)
    runs = _chip_runs(client)
    kinds: dict[str, list] = {}
    for run in runs:
        tags = run.data.tags
        kind = ("group" if names.TAG_GROUP in tags and names.TAG_CHIP not in tags
                else "member" if names.TAG_GROUP_RUN in tags
                else "rejected" if tags.get(names.TAG_REJECTED) == "true" else "alone")
        kinds.setdefault(kind, []).append(run)
    assert sorted(kinds) == ["alone", "group", "member", "rejected"]   # the setup has each
    for run in kinds["rejected"]:                 # the plan rejected it: nothing trained
        chip = run.data.tags[names.TAG_CHIP]
        assert run.info.run_name == f"{chip} (rejected by plan)"
        assert run.data.tags[names.TAG_VERDICT] == "rejected"
        assert run.data.tags[names.TAG_TRAINED] == "false"
        assert run.info.end_time == run.info.start_time and run.data.metrics == {}
        assert _description(run).startswith("**Rejected by the plan, not trained** (")
        assert run.data.params["reason"] in _description(run)
    for run in kinds["alone"]:
        chip = run.data.tags[names.TAG_CHIP]
        (version,) = client.search_model_versions(f"name = '{PREFIX}-{chip}'")
        assert run.info.run_name == f"{chip} (shipped)"
        assert run.data.tags[names.TAG_VERDICT] == "shipped"
        assert f"(#/models/{PREFIX}-{chip}/versions/{version.version})" in _description(run)
        assert version.run_id == run.info.run_id
    (group,) = kinds["group"]
    group_id = group.data.tags[names.TAG_GROUP]
    assert group.info.run_name == f"{group_id} (shipped)"
    (group_model,) = [o.model_id for o in group.outputs.model_outputs]
    for run in kinds["member"]:                   # shipped with the group's model
        chip = run.data.tags[names.TAG_CHIP]
        (version,) = client.search_model_versions(f"name = '{PREFIX}-{chip}'")
        assert run.info.run_name == f"{chip} (shipped, {group_id})"
        assert run.data.tags[names.TAG_TRAINED] == "false"
        assert [o.model_id for o in run.outputs.model_outputs] == [group_model]
        description = _description(run)
        assert f"/runs/{group.info.run_id}?" in description
        assert f"(#/models/{PREFIX}-{chip}/versions/{version.version})" in description
        assert f"/runs/{run.info.run_id}?" in _description(group)      # and back


def test_a_group_that_missed_at_the_cap_says_so_and_logs_no_model(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check misses (a guard band no model reaches): the group's run says it missed and
    logged no model (none ships); its chips, trained alone, say they were rejected at the cap
    and which group they left."""

    from reduce_ops.cli import main

    clone = clone_project(project, tmp_path / "miss")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(clone)
    make_every_check_miss(monkeypatch)
    assert main(["fat", "--force", "--params", str(clone / "params.yaml")]) == 0
    runs = _chip_runs(_client(clone))
    (group,) = [r for r in runs if names.TAG_GROUP in r.data.tags
                and names.TAG_CHIP not in r.data.tags]
    group_id = group.data.tags[names.TAG_GROUP]
    assert group.info.run_name == f"{group_id} (missed at cap)"
    assert group.data.tags[names.TAG_VERDICT] == "missed"
    assert not group.outputs or not group.outputs.model_outputs          # no model logged
    assert _description(group).startswith("**Missed at the budget cap**")
    alone = [r for r in runs if r.data.tags.get(names.TAG_GROUP) != group_id
             and names.TAG_CHIP in r.data.tags and names.TAG_REJECTED not in r.data.tags]
    members = [r for r in alone if f"eFAT group {group_id} missed" in _description(r)]
    assert len(members) == int(group.data.params["n_members"])
    for run in alone:
        assert run.info.run_name.endswith("(rejected at cap)")
        assert run.data.tags[names.TAG_VERDICT] == "rejected"
        assert _description(run).startswith("**Rejected**")


# --------------------------------------------------------------------------- times

def _history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)


def test_runs_span_their_work_and_metrics_carry_when_they_were_measured(project: Path) -> None:
    client = _client(project)
    stages = _stage_runs(client)
    trials = client.search_runs([stages["resilience"].data.tags[names.TAG_CHILDREN_EXPERIMENT]])
    assert trials
    for run in trials:
        start, end = run.info.start_time, run.info.end_time
        seconds = run.data.metrics[names.TRIAL_SECONDS]
        assert end - start >= 0.9 * seconds * 1000 - 2      # the trial, not its logging
        times = [m.timestamp for m in _history(client, run.info.run_id, names.VAL_ACCURACY)]
        assert len(times) > 1 and times == sorted(times) and times[0] < times[-1]
        assert start <= times[0] and times[-1] <= end
        assert run.info.run_name == trials_record.run_name(TrialSpec(
            float(run.data.params["fault_rate"]), int(run.data.params["repetition"]), 0))
    for run in _chip_runs(client):
        if run.data.tags.get(names.TAG_TRAINED) != "true":
            continue
        start, end = run.info.start_time, run.info.end_time
        assert end - start >= run.data.metrics["train_seconds"] * 1000 - 2
        checks = [m.timestamp for m in _history(client, run.info.run_id, names.VAL_ACCURACY)]
        assert start <= checks[0] and checks == sorted(checks) and checks[-1] <= end
        (test,) = client.get_metric_history(run.info.run_id, names.TEST_ACCURACY)
        assert checks[-1] <= test.timestamp <= end


def test_a_reused_trial_keeps_the_times_of_its_work() -> None:
    """A trial reused from a killed run is logged again with the times it was measured then."""
    spec = TrialSpec(0.1, 0, 7)
    result = TrialResult(spec, 3, 0.1, [0.0, 0.25], [0.5, 0.6], [0.5, 0.6], 2.0, 0.25,
                         val_lost=[0, 1], val_gained=[0, 2], started=1000.0,
                         times=[1000.5, 1001.5])
    params, history, tags = trials_record.run_payload(result)
    assert history[names.VAL_ACCURACY] == [(0, 0.5, 1000.5), (250, 0.6, 1001.5)]
    assert trials_record.run_span(result) == (1000.0, 1001.5)
    child = {"run_id": "old", "params": {k: str(v) for k, v in params.items()}, "tags": tags,
             "histories": {k: [p[:2] for p in h] for k, h in history.items()},
             "times": {k: [(p[0], p[2]) for p in h if len(p) > 2] for k, h in history.items()},
             "span": (1000.0, 1001.5)}
    again = trials_record.from_run(child)
    assert (again.started, again.times) == (1000.0, [1000.5, 1001.5])


# --------------------------------------------------------------------------- models

def test_registered_versions_link_their_logged_model_and_source_run(project: Path) -> None:
    client = _client(project)
    chips_exp = _stage_runs(client)["fat"].data.tags[names.TAG_CHILDREN_EXPERIMENT]
    versions = client.search_model_versions(f"name LIKE '{PREFIX}-%'")
    assert versions
    for mv in versions:
        model_id = mv.source.removeprefix("models:/")
        model = client.get_logged_model(model_id)
        assert model.experiment_id == chips_exp and model.source_run_id == mv.run_id
        run = client.get_run(mv.run_id)
        assert model.name == run.data.tags.get(names.TAG_CHIP, run.data.tags.get(names.TAG_GROUP))
        listed = json.loads(model.tags["mlflow.modelVersions"])
        assert {"name": mv.name, "version": str(mv.version)} in listed
        assert f"/runs/{mv.run_id}?" in mv.description
        assert f"/models/{model_id})" in mv.description
        # what people read is rounded; the run's param keeps every digit
        for tags in (mv.tags, client.get_registered_model(mv.name).tags):
            assert re.fullmatch(r"\d\.\d{4}", tags[names.VTAG_FAULT_RATE]), tags
        chip_run = client.search_runs(
            [chips_exp], f"tags.`{names.TAG_CHIP}` = '{mv.tags['chip_id']}'")[0]
        exact = float(chip_run.data.params["fault_rate"])
        assert f"{exact:.4f}" == mv.tags[names.VTAG_FAULT_RATE]


def test_the_resilience_run_shows_its_result_as_a_table(project: Path) -> None:
    client = _client(project)
    text = _description(_stage_runs(client)["resilience"])
    assert "| fault rate | 0 epochs |" in text
    for rate in ("0.0000", "0.1000", "0.2000"):
        assert f"\n| {rate} | " in text
    assert "**Retraining needed to reach val_accuracy" in text


# --------------------------------------------------------------------------- in a browser

def _browser() -> tuple[str, str]:
    """Chromium and its chromedriver, or a skip that says what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("Selenium is not installed (`make install` installs it)")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium or its chromedriver is not installed (Debian: apt-get install "
                    "chromium chromium-driver; .ci/run installs them)")
    return chromium, driver


SHOTS = os.environ.get("REDUCE_OPS_SCREENSHOTS")   # a folder: the README's screenshots too


@pytest.mark.slow
def test_a_browser_shows_every_stage_first_verdicts_and_linked_models(
        project: Path, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = _browser()
    client = _client(project)
    chips = {r.info.run_name: r for r in _chip_runs(client)}
    rejected = next(n for n in sorted(chips) if n.endswith("(rejected by plan)"))
    shipped = next(n for n in sorted(chips) if n.endswith(" (shipped)")
                   and not n.startswith("group"))
    chip = chips[shipped].data.tags[names.TAG_CHIP]
    (version,) = client.search_model_versions(f"name = '{PREFIX}-{chip}'")

    port = free_port()
    log = tmp_path / "ui.stderr"
    ui = start_ui(project, port, log)
    browser = None
    try:
        address = re.search(r"http://\S+workflowType=machine_learning",
                            ui.stdout.readline()).group(0)
        wait_until_healthy(ui, port, log)

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1600,1000"):
            options.add_argument(arg)
        browser = webdriver.Chrome(options=options, service=Service(chromedriver))

        def viewport() -> None:             # of the screenshots: 1600 x 1000 in every tab
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        viewport()
        def until(condition, what: str) -> None:     # noqa: ANN001 - a callable
            try:
                WebDriverWait(browser, 120).until(condition)
            except TimeoutException:
                browser.save_screenshot(str(tmp_path / "timeout.png"))
                page = text()
                raise AssertionError(f"{what}: not seen in 120 s at {browser.current_url} "
                                     f"(screenshot {tmp_path / 'timeout.png'}):\n{page[:3000]}"
                                     ) from None

        def links() -> dict[str, str]:
            """{text: address} of the page's links (read at once: React redraws the page)."""
            return {text: href for text, href in browser.execute_script(
                "return Array.from(document.querySelectorAll('a'))"
                ".map(a => [a.innerText.trim(), a.href])") if text}

        def text() -> str:
            return browser.execute_script("return document.body.innerText")

        def shoot(name: str) -> None:
            for close in browser.find_elements(
                    By.CSS_SELECTOR, "[data-component-id='mlflow.assistant.chat_panel.close']"):
                close.click()                      # MLflow's assistant panel: not ours
            time.sleep(1)
            browser.save_screenshot(str(tmp_path / name))
            if SHOTS:
                Path(SHOTS).mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(str(Path(SHOTS) / name))

        # 1. The printed address, as a new user opens it: every stage run on the first page.
        browser.get(address)
        until(lambda b: set(LOGGED_STAGES) <= set(links()), "every stage run")
        body = text()
        assert f"{len(LOGGED_STAGES)} matching runs" in body and "Load more" not in body
        shoot("mlflow-stage-runs.png")

        # 2. fat's run; its description links its chips' runs (a new tab, as every link of a
        # description opens).
        browser.find_element(By.LINK_TEXT, "fat").click()
        until(lambda b: "open them" in links(), "the link to fat's chips")
        browser.find_element(By.LINK_TEXT, "open them").click()
        until(lambda b: len(b.window_handles) == 2, "a tab with fat's chips")
        browser.switch_to.window(browser.window_handles[1])
        viewport()
        until(lambda b: rejected in links() and shipped in links(), "the chips' runs")
        body = text()
        assert f"{len(chips)} matching runs" in body           # this fat run's chips only
        shoot("mlflow-chip-runs.png")

        # 3. A rejected chip's page says so: its name, its description.
        browser.find_element(By.LINK_TEXT, rejected).click()
        until(lambda b: "Rejected by the plan, not trained" in
              text(), "the rejected chip's description")
        assert rejected in text()
        shoot("mlflow-rejected-chip.png")

        # 4. A shipped chip's page links its registered version, which links the run back.
        browser.back()
        until(lambda b: shipped in links(), "the chips' runs again")
        browser.find_element(By.LINK_TEXT, shipped).click()
        target = f"/models/{PREFIX}-{chip}/versions/{version.version}"
        until(lambda b: any(h.endswith(target) for h in links().values()),
              "a link to the chip's registered version")
        shoot("mlflow-shipped-chip.png")
        browser.get(next(h for h in links().values() if h.endswith(target)))
        until(lambda b: shipped in links() and "Source Run" in
              text(), "the version's source run")
        assert f"/runs/{chips[shipped].info.run_id}" in links()[shipped]
        shoot("mlflow-model-version.png")

        # 5. The resilience result as a table on the resilience run's page.
        browser.get(address)
        until(lambda b: "resilience" in links(), "the stage runs again")
        browser.find_element(By.LINK_TEXT, "resilience").click()
        until(lambda b: "Show more" in text(), "the resilience run's description")
        browser.find_element(By.XPATH, "//*[normalize-space(text())='Show more']").click()
        until(lambda b: "Retraining needed to reach" in text(), "the resilience tables")
        shoot("mlflow-resilience.png")
    finally:
        if browser is not None:
            browser.quit()
        if ui.poll() is None:
            ui.send_signal(signal.SIGINT)          # reduce-ops stops the server's whole tree
            try:
                ui.wait(timeout=60)
            except subprocess.TimeoutExpired:
                ui.kill()
                ui.wait()

"""The tracking store when it is away, misnamed, broken or being created (issue 24): one line
naming MLFLOW_TRACKING_URI and a non-zero exit within seconds instead of minutes of retries; a
store that a killed process was creating never blocks later commands; a killed logging
process leaves no run RUNNING forever."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_project

from reduce_ops.cli import main
from reduce_ops.errors import TrackingError
from reduce_ops.tracking import store


def _one_line(capsys: pytest.CaptureFixture, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project").parent


@pytest.mark.parametrize("argv", [["fetch", "chip-001"], ["plan"], ["resilience"], ["fat"]])
def test_an_unreachable_server_is_one_line_naming_the_variable(
        project: Path, argv: list[str]) -> None:
    """In a fresh process, as a user runs it (MLflow's own retries would wait for minutes): the
    generous timeout here only keeps a broken build from hanging the suite."""
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-m", "reduce_ops", *argv, "--params",
                           str(project / "params.yaml")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"MLFLOW_TRACKING_URI={uri}" in lines[0] and "unreachable" in lines[0]
    assert not (project / "mlflow.db").exists() and not (project / "results").exists()


def test_a_server_that_never_answers_is_no_answer() -> None:
    """A port that accepts connections but never replies (a hung server, a firewall that
    swallows packets): the check gives up after its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(TrackingError, match=r"MLFLOW_TRACKING_URI=.*no answer within 0.5 s"):
            store.check_store(uri, from_env=True, timeout=0.5)
    finally:
        listener.close()


def test_a_database_server_away_is_one_line() -> None:
    uri = f"postgresql://user:pw@127.0.0.1:{_closed_port()}/mlflow"
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI=postgresql.*cannot connect"):
        store.check_store(uri, from_env=True, timeout=2.0)


@pytest.mark.parametrize("stage", ["fetch", "plan"])
def test_sqlite_in_a_folder_that_does_not_exist_is_one_line_and_creates_nothing(
        project: Path, tmp_path: Path, stage: str, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nonexistent/dir"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}/x.db")
    argv = [stage, "chip-001"] if stage == "fetch" else [stage]
    assert main([*argv, "--params", str(project / "params.yaml")]) == 2
    _one_line(capsys, "MLFLOW_TRACKING_URI=sqlite", f"folder {missing} does not exist")
    assert not (tmp_path / "nonexistent").exists()


def test_fetch_from_a_store_that_is_not_there_creates_none(
        project: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'typo.db'}")
    assert main(["fetch", "chip-001", "--params", str(project / "params.yaml")]) == 2
    _one_line(capsys, "no store there yet")
    assert not (tmp_path / "typo.db").exists()


@pytest.mark.parametrize("content", [b"not a database at all\n", None])
def test_a_garbage_or_truncated_store_is_one_line(
        project: Path, tmp_path: Path, content: bytes | None, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "store.db"
    if content is None:                 # a real store cut short (a copy that did not finish)
        store.ensure_store(f"sqlite:///{tmp_path / 'whole.db'}")
        content = (tmp_path / "whole.db").read_bytes()[:20000]
    path.write_bytes(content)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    for argv in (["fetch", "chip-001"], ["plan"]):
        assert main([*argv, "--params", str(project / "params.yaml")]) == 2
        _one_line(capsys, "MLFLOW_TRACKING_URI=sqlite")
    assert path.read_bytes() == content                         # left as it was


_KILLED_CREATOR = """
import os, signal, sys
from sqlalchemy.engine.base import Connection
n, run = [0], Connection.execute
def counted(self, *a, **k):
    out = run(self, *a, **k)
    n[0] += 1
    if n[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
Connection.execute = counted
if sys.argv[1] == "reduce-ops":
    from reduce_ops.tracking.store import ensure_store
    ensure_store(sys.argv[2])
else:                                  # MLflow on its own (what older reduce-ops did)
    from mlflow.tracking import MlflowClient
    MlflowClient(sys.argv[2]).search_experiments()
"""


def _kill_creator(who: str, uri: str, statements: int) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILLED_CREATOR, who, uri, str(statements)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.parametrize("statements", [1, 40, 150, 400])
def test_a_store_killed_while_being_created_never_blocks_later_commands(
        tmp_path: Path, statements: int) -> None:
    """SIGKILL after the N-th SQL statement of a new store's creation (its migrations): no
    half-made store is left under the store's name, and the next use creates a whole one."""
    path = tmp_path / "mlflow.db"
    _kill_creator("reduce-ops", f"sqlite:///{path}", statements)
    assert not path.exists()
    store.ensure_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:                                 # whole: every table
        tables = {r[0] for r in db.execute("select name from sqlite_master")}
    assert {"runs", "experiments", "registered_models", "model_versions"} <= tables
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]   # temporaries swept


def test_a_store_left_half_made_by_an_older_creator_is_set_aside(
        project: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store an older reduce-ops (or MLflow itself) was killed creating ('table ... already
    exists' on every later command): with no run in it, it is renamed aside and a new one is
    made; nothing is deleted."""
    path = project / "half.db"
    _kill_creator("mlflow", f"sqlite:///{path}", 150)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    assert main(["fetch", "chip-001", "--params", str(project / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "incomplete MLflow store" in err and "no chip is registered yet" in err
    assert [p for p in project.iterdir() if p.name.startswith("half.db.incomplete-")]


def _die_in_an_open_run(stage) -> None:
    from reduce_ops.tracking.modelrun import model_child_run

    with model_child_run(stage, "chip x", {"chip_id": "x"}):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_logging_process_is_one_error_and_no_run_stays_running(
        tmp_path: Path) -> None:
    from reduce_ops.tracking.logger import BackgroundTracking
    from reduce_ops.tracking.runs import find_runs, stage_run

    uri = os.environ["MLFLOW_TRACKING_URI"]
    with pytest.raises(TrackingError, match="logs and registers the models died"), \
            stage_run(tmp_path, "fat", "test") as stage:
        queue = BackgroundTracking(stage).start()
        try:
            queue.submit(_die_in_an_open_run)
            queue.drain()
        finally:
            queue.close()
    runs = find_runs(uri, {"mlflow.parentRunId": stage.run_id})
    assert [r.status for r in runs] == ["KILLED"]
    (parent,) = find_runs(uri, {"reduce_ops.stage": "fat"})
    assert parent.status == "FAILED"


def test_a_web_server_that_is_not_mlflow_is_one_line() -> None:
    """Something answers at the address, but not MLflow (404 on /health): said at once, not
    after the first real request failed with an unrelated message."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(TrackingError, match="HTTP 404.*not an MLflow tracking server"):
            store.check_store(uri, from_env=True)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_relative_sqlite_uri_is_made_absolute_for_every_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLFLOW_TRACKING_URI=sqlite:///mlflow.db names a file relative to the current folder; the
    logging process, `mlflow ui` (started in the project folder) and Ray workers must open the
    same one: the variable is made absolute."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    uri = store.tracking_uri(tmp_path / "elsewhere")
    assert uri == f"sqlite:///{tmp_path / 'runs/mlflow.db'}"
    assert os.environ["MLFLOW_TRACKING_URI"] == uri


def test_a_store_error_is_not_reported_as_a_missing_run(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """get_run said "not found ... run `reduce-ops resilience`" for any MLflow error (a server
    error, a locked database): only a missing run is a missing run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from reduce_ops.tracking.runs import get_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(TrackingError, match="not found"):
        get_run(uri, "0" * 32)

    def broken(self, run_id):
        raise MlflowException("database is locked", error_code="INTERNAL_ERROR")

    monkeypatch.setattr(MlflowClient, "get_run", broken)
    with pytest.raises(MlflowException, match="locked"):
        get_run(uri, "0" * 32)
    assert store.store_failure(MlflowException("database is locked")).endswith(
        "MlflowException: database is locked")


def test_a_deleted_resilience_run_is_not_planned_from(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from reduce_ops import names, provenance
    from reduce_ops.config import load_config
    from reduce_ops.tracking.runs import stage_run

    params = make_project(tmp_path / "project", ["plan.resilience_run=placeholder"])
    with stage_run(params.parent, "resilience", "test") as stage:
        stage.set_tags({names.TAG_STAGE: "resilience"})
    store.client_for(os.environ["MLFLOW_TRACKING_URI"]).delete_run(stage.run_id)
    cfg = load_config(params, [f"plan.resilience_run={stage.run_id}"])
    with pytest.raises(TrackingError, match="was deleted"):
        provenance.resilience_run(cfg, provenance.Identity(None, "d"))


_TERM_AFTER = """
import functools, os, signal, sys
from reduce_ops import progress
done = progress.Progress.done

@functools.wraps(done)
def done_then_term(self, *args, **kwargs):
    done(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)          # what a scheduler's stop or `kill` sends

progress.Progress.done = done_then_term
from reduce_ops.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_ends_a_stage_like_ctrl_c(project: Path) -> None:
    """SIGTERM mid-stage: the stage's run ends KILLED (not RUNNING until a later run reaps
    it), nothing is half-written, exit 143."""
    from reduce_ops.tracking.runs import find_runs

    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID")}
    params = str(project / "params.yaml")
    subprocess.run([sys.executable, "-m", "reduce_ops", "prepare", "--params", params],
                   cwd=project, env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-c", _TERM_AFTER, "pretrain", "--params", params],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "reduce-ops pretrain: terminated"
    (run,) = find_runs(f"sqlite:///{project / 'mlflow.db'}", {"reduce_ops.stage": "pretrain"})
    assert run.status == "KILLED"
    assert not (project / "models/baseline.pt").exists()


def test_a_read_only_store_is_one_line_before_any_work(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A store (or its folder) a stage cannot write: said before any work. (Simulated: root
    may write anywhere.) Reading it, as fetch does, is fine."""
    path = tmp_path / "store.db"
    store.ensure_store(f"sqlite:///{path}")
    monkeypatch.setattr(os, "access", lambda p, mode: mode != os.W_OK)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI=.*read-only"):
        store.check_store(f"sqlite:///{path}", from_env=True)
    store.check_store(f"sqlite:///{path}", from_env=True, create=False)


def test_a_full_or_locked_store_mid_stage_is_one_line() -> None:
    """What SQLite says when the disk under the store fills up, or the store is read-only,
    reaches the user as one line naming the store; an error of our own stays a traceback."""
    from sqlalchemy.exc import OperationalError

    full = OperationalError("INSERT INTO metrics ...", {}, Exception("database or disk is full"))
    line = store.store_failure(full)
    assert line is not None and "\n" not in line and "database or disk is full" in line
    assert store.store_failure(KeyError("chip-009")) is None


def test_load_chip_model_from_a_server_that_is_away_fails_fast() -> None:
    import reduce_ops

    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(TrackingError, match="unreachable"):
        reduce_ops.load_chip_model("chip-001", tracking_uri=uri)


class _Scaled(torch.nn.Module):
    """A Linear times a number its repr does not show: the same key, another graph."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.linear, self.scale = torch.nn.Linear(4, 3), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def test_mlflow_serves_and_exports_the_first_model_of_an_architecture_and_every_model_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's serving check (load the model back, predict its input example) runs once per
    architecture and input in a process, and so does torch.export: a later model's model.pt2
    is the first one's graph with its own weights, the graph and weights of its own fresh
    export; a model whose graph differs under the same repr is exported afresh. Every logged model
    loads and answers as its own weights do."""
    import mlflow.artifacts
    import mlflow.models.utils
    import mlflow.pytorch

    from reduce_ops.tracking import modelrun
    from reduce_ops.tracking.runs import stage_run

    monkeypatch.setattr(modelrun, "_SERVED", set())
    monkeypatch.setattr(modelrun, "_EXPORTED", {})
    checked, exported = [], []
    real = mlflow.models.utils._validate_serving_input
    monkeypatch.setattr(mlflow.models.utils, "_validate_serving_input",
                        lambda *a, **k: checked.append(1) or real(*a, **k))
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export",
                        lambda *a, **k: exported.append(1) or real_export(*a, **k))
    example = torch.randn(2, 4)
    models = [m.eval() for m in (torch.nn.Linear(4, 3), torch.nn.Linear(4, 3),
                                 torch.nn.Linear(4, 5), _Scaled(1.0), _Scaled(2.0))]
    with stage_run(tmp_path, "fat", "test") as stage:
        logged = []
        for i, m in enumerate(models):
            with modelrun.model_child_run(stage, f"chip {i}", {"chip_id": i}) as child:
                logged.append(child.log_pytorch_model(m, example.numpy(), ["torch"]))
    assert len(checked) == 3                   # the first Linear(4, 3), Linear(4, 5), _Scaled
    assert len(exported) == 4                  # and the second _Scaled: its answers differ
    monkeypatch.setattr(modelrun, "_EXPORTED", {})
    mlflow.pytorch.save_model(models[1], tmp_path / "fresh", input_example=example.numpy(),
                              pip_requirements=["torch"], serialization_format="pt2")
    second = Path(mlflow.artifacts.download_artifacts(logged[1].model_uri, dst_path=str(
        tmp_path / "second")))
    got, fresh = (torch.export.load(f / "data/model.pt2") for f in (second, tmp_path / "fresh"))
    assert got.graph_module.code == fresh.graph_module.code
    assert str(got.graph_signature) == str(fresh.graph_signature)
    assert list(got.state_dict) == list(fresh.state_dict) and all(
        torch.equal(got.state_dict[k], fresh.state_dict[k]) for k in fresh.state_dict)
    for m, info in zip(models, logged):
        assert info.serialization_format == "pt2"
        back = mlflow.pytorch.load_model(info.model_uri)
        assert torch.allclose(back(example), m(example))


class _Tied(torch.nn.Module):
    """Two Linear layers sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class _Offset(torch.nn.Module):
    """A Linear with, or without, a buffer added to its answer: the same repr either way."""

    def __init__(self, offset: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        if offset:
            self.register_buffer("offset", torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + getattr(self, "offset", 0.0)

    def extra_repr(self) -> str:
        return "offset or not"


@pytest.mark.parametrize("models", [lambda: (_Tied(), _Tied()),
                                    lambda: (_Offset(False), _Offset(True)),
                                    lambda: (_Offset(True), _Offset(False))],
                         ids=["tied-weights", "an-extra-buffer", "a-missing-buffer"])
def test_an_export_under_one_key_is_each_models_own(models, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """Models that share a key but not what their repr shows (tied weights, a buffer more or
    less): what the export in `_export_once` gives each is the program of its own fresh export:
    its answers, tensor names and values."""
    from reduce_ops.tracking import modelrun

    monkeypatch.setattr(modelrun, "_EXPORTED", {})
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    for model in (m.eval() for m in models()):
        with modelrun._export_once(model, ("one key",)):
            got = torch.export.export(model, (x,))
        fresh = torch.export.export(model, (x,))
        with torch.no_grad():
            assert torch.equal(got.module()(x), model(x))
        held = {**got.state_dict, **got.constants}
        own = {**fresh.state_dict, **fresh.constants}
        assert list(held) == list(own) and all(torch.equal(held[k], own[k]) for k in own)

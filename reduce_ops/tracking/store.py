"""Where runs are recorded: the tracking store's URI, creating it once, experiments, the UI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reduce_ops import names

MAX_PARAM_LEN = 6000


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set (a team's server); else SQLite at the project root (absolute).
    A relative SQLite path in the variable is made absolute (from the current folder) and
    written back, so that every process (the logging process, `mlflow ui` started in the
    project folder, Ray workers) opens the same file."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        path = _sqlite_path(env)
        if path is not None and not path.is_absolute():
            query = env.partition("?")[2]
            env = f"sqlite:///{path.resolve()}" + (f"?{query}" if query else "")
            os.environ["MLFLOW_TRACKING_URI"] = env
        return env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


CONNECT_TIMEOUT_S = 5.0     # a tracking server that does not answer within this is away
SQLITE_HEADER = b"SQLite format 3\x00"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of an sqlite:/// URI (None: another store, or in memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def ensure_store(uri: str) -> None:
    """Create (migrate) an SQLite store once, before any parallel writer can race on it: a new
    store is migrated under a temporary name and linked into place only when complete, so a
    process killed meanwhile (SIGKILL, power) leaves no half-made store behind."""
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store: noise in a stage's log
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    path = _sqlite_path(uri)
    if path is not None and not path.exists():
        _create_sqlite(path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception:
        if path is None or not _set_aside_if_empty(path):
            raise
        _forget_engines(uri)                    # their connections hold the file set aside
        _create_sqlite(path)
        MlflowClient(uri).search_experiments(max_results=1)


def _forget_engines(uri: str) -> None:
    """Drop the database engines MLflow keeps per URI (tracking and registry stores)."""
    from mlflow.store.model_registry.sqlalchemy_store import (
        SqlAlchemyStore as RegistryStore,
    )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for store in (TrackingStore, RegistryStore):
        engine = getattr(store, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()


def _set_aside_if_empty(path: Path) -> bool:
    """A store that fails to open and holds no run and no registered model (a creation that
    an older reduce-ops or MLflow itself left half-done when killed) is renamed aside, so that
    a new one can be made; True when it was. A store with any run is never touched."""
    import sqlite3
    import sys
    import time

    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {r[0] for r in db.execute("select name from sqlite_master "
                                               "where type = 'table'")}
            held = sum(db.execute(f"select count(*) from {t}").fetchone()[0]
                       for t in ("runs", "registered_models") if t in tables)
    except sqlite3.Error:
        return False                             # not even readable as SQLite: the user's call
    if held:
        return False
    aside = path.with_name(f"{path.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    print(f"reduce-ops: {path} was an incomplete MLflow store without runs (a creation killed "
          f"midway); kept as {aside.name}, a new store is created", file=sys.stderr)
    return True


def open_existing(uri: str) -> None:
    """Open an existing SQLite store once (ensure_store), before a stage's work: one that a
    killed creator left half-made, holding no run, is set aside and made anew. Nothing is
    created where there is no store."""
    path = _sqlite_path(uri)
    if path is not None and path.is_file():
        ensure_store(uri)


def client_for(uri: str) -> Any:
    """An MlflowClient on `uri` for runs and the registry alike; a new SQLite store is made
    whole first (ensure_store), never half-created by the client's own first use."""
    from mlflow.tracking import MlflowClient

    path = _sqlite_path(uri)
    if path is not None and not path.exists():
        ensure_store(uri)
    return MlflowClient(uri, registry_uri=uri)


def _create_sqlite(path: Path) -> None:
    """A complete new store at `path`: migrated at a temporary name beside it, then hard-linked
    to `path` (which fails if another process made it first: theirs is used), then the
    temporary name removed. Temporaries of killed creators are swept first."""
    from mlflow.tracking import MlflowClient

    from reduce_ops.atomic import sweep, temp_sibling

    sweep(path, ("new",))
    tmp = temp_sibling(path, "new")
    try:
        MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)   # migrates
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass                                 # another process created it meanwhile
        except OSError:                          # a filesystem without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def check_store(uri: str, from_env: bool, create: bool = True,
                timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Before any work: one TrackingError line when the store cannot be used. A tracking
    server or database that does not answer within `timeout` s, an SQLite path in a folder
    that does not exist, a file that is not an SQLite database, a store that is not there
    yet when nothing may be created (`create` False: reading, e.g. fetch). The line names
    MLFLOW_TRACKING_URI when the URI comes from it (`from_env`)."""
    from urllib.parse import urlsplit

    from reduce_ops.errors import TrackingError

    where = (f"MLFLOW_TRACKING_URI={uri}" if from_env else f"the project's MLflow store {uri}")
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    if scheme in ("http", "https"):
        problem = _http_problem(uri, timeout)
        remedy = "start the server or unset MLFLOW_TRACKING_URI (the project's own mlflow.db)"
    elif scheme in _DB_PORTS:
        problem = _tcp_problem(parts.hostname or "localhost", parts.port or _DB_PORTS[scheme],
                               timeout)
        remedy = "start the database or fix MLFLOW_TRACKING_URI"
    elif scheme == "sqlite":
        problem = _sqlite_problem(_sqlite_path(uri), create)
        remedy = "fix MLFLOW_TRACKING_URI" if from_env else "move it away"
    else:
        return
    if problem:
        raise TrackingError(f"{where}: {problem}; {remedy}")


_DB_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def _sqlite_problem(path: Path | None, create: bool) -> str:
    if path is None:
        return ""
    if path.is_dir():
        return "is a folder, not an SQLite database file"
    if not path.parent.is_dir():
        return f"folder {path.parent} does not exist (a typo?)"
    if not path.exists():
        if not create:
            return "no store there yet: nothing has been tracked in it"
        if not os.access(path.parent, os.W_OK):
            return f"cannot create the store: folder {path.parent} is read-only"
        return ""
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if head and head != SQLITE_HEADER:
        return "not an SQLite database (its first bytes say otherwise)"
    if create and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        return "the store (or its folder) is read-only"
    return ""


def _in_time(probe: Any, timeout: float) -> str:
    """Run probe() -> problem text in a thread; "no answer" when it takes longer than
    `timeout` (a name lookup or a server that accepts but never answers)."""
    import threading

    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(probe()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or not result:
        return f"no answer within {timeout:g} s"
    return result[0]


def _tcp_problem(host: str, port: int, timeout: float) -> str:
    import socket

    def probe() -> str:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except OSError as exc:
            return f"cannot connect to {host}:{port} ({exc.strerror or exc})"
        return ""

    return _in_time(probe, timeout)


def _http_problem(uri: str, timeout: float) -> str:
    """"" when an MLflow server answers its health check (or asks for a login: 401, 403)."""
    import urllib.error
    import urllib.request

    def probe() -> str:
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return ""                         # an MLflow server behind a login
            return (f"answers HTTP {exc.code} to {uri.rstrip('/')}/health: not an MLflow "
                    f"tracking server (or not running behind that address)")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                return f"no answer within {timeout:g} s"
            return f"tracking server unreachable ({getattr(reason, 'strerror', None) or reason})"
        return ""

    return _in_time(probe, timeout)


def store_failure(exc: BaseException) -> str | None:
    """One line for an error that the tracking store or the disk raised mid-stage (a corrupt,
    read-only or full store, a server gone): None for any other error (a bug, shown in full)."""
    import errno

    root = type(exc).__module__.split(".")[0]
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    if root in ("mlflow", "sqlalchemy", "sqlite3", "requests", "urllib3", "alembic"):
        env = os.environ.get("MLFLOW_TRACKING_URI")
        where = f"MLFLOW_TRACKING_URI={env}" if env else "the project's MLflow store (mlflow.db)"
        return f"{where}: {type(exc).__name__}: {text}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT,
                                                  errno.EACCES, errno.EIO):
        return f"{exc.filename or 'disk'}: {exc.strerror}"
    return None


def experiment_id_of(client: Any, name: str, uri: str) -> str:
    """Id of the named experiment, created if missing; with an SQLite store its artifacts go
    to `mlruns/` beside the database file (not the current folder's, MLflow's default)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={names.TAG_EXPERIMENT_KIND: names.EXPERIMENT_KIND})
    except MlflowException as exc:
        # another pipeline on the same server created it between our lookup and create
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def mark_model_training(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model training, so the UI opens on its runs (not GenAI traces);
    covers experiments made by `mlflow run --experiment-name` or MLflow's Default."""
    exp = client.get_experiment(experiment_id)
    if (exp.tags or {}).get(names.TAG_EXPERIMENT_KIND) != names.EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, names.TAG_EXPERIMENT_KIND,
                                  names.EXPERIMENT_KIND)


def param_text(value: Any) -> str:
    """A parameter's value as MLflow stores it (text, shortened past MAX_PARAM_LEN)."""
    text = str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[:MAX_PARAM_LEN - 3] + "..."



def all_experiment_ids(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments(max_results=1000)]



def experiment_page(base_url: str, uri: str, experiment: str) -> str:
    """The UI address of an experiment's training runs. MLflow 3's UI opens on its GenAI view
    unless told otherwise (a global switch, remembered by the browser), hence workflowType."""

    ensure_store(uri)
    exp = client_for(uri).get_experiment_by_name(experiment)
    where = f"experiments/{exp.experiment_id}" if exp is not None else "experiments"
    return f"{base_url.rstrip('/')}/#/{where}?workflowType=machine_learning"


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` serving a local store (for a tracking server, open its address instead)."""
    import sys

    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
            "--port", str(port), "--workers", "1"]      # one browser needs no more


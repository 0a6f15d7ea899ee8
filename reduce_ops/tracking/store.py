"""Where runs are recorded: the tracking store's URI, creating it once, experiments, the UI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from reduce_ops import names

MAX_PARAM_LEN = 6000


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set (a team's server); else SQLite at the project root (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def ensure_store(uri: str) -> None:
    """Create (migrate) an SQLite store once, before any parallel writer can race on it."""
    import logging

    import mlflow
    from mlflow.tracking import MlflowClient

    # "Creating initial MLflow database tables..." on every new store: noise in a stage's log
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    MlflowClient(uri).search_experiments(max_results=1)


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
    from mlflow.tracking import MlflowClient

    ensure_store(uri)
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    where = f"experiments/{exp.experiment_id}" if exp is not None else "experiments"
    return f"{base_url.rstrip('/')}/#/{where}?workflowType=machine_learning"


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` serving a local store (for a tracking server, open its address instead)."""
    import sys

    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host,
            "--port", str(port), "--workers", "1"]      # one browser needs no more


"""How runs are laid out for a person browsing the MLflow UI: the stage runs alone in the
pipeline's experiment (so that every stage is on the first page), the many runs of one kind
(trials, chips, policies...) in an experiment of their own beside it, linked both ways; UI
addresses; descriptions (markdown, shown on a run's page)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from reduce_ops import names

TAG_DESCRIPTION = "mlflow.note.content"      # MLflow's own: the run page's Description
MAX_DESCRIPTION = 7000                       # characters (a tag value holds 8,000)
# MLflow 3's UI opens a page in its GenAI layout unless the address asks for model training
ML_VIEW = "workflowType=machine_learning"


def children_experiment(client: Any, uri: str, experiment_id: str, kind: str) -> str:
    """The id of experiment `<name of experiment_id>/<kind>` (created if missing, with its
    artifacts beside the store's like the stage's), where a stage's runs of `kind` go."""
    from reduce_ops.tracking.store import experiment_id_of, mark_model_training

    parent = client.get_experiment(experiment_id)
    name = f"{parent.name}/{kind}"
    exp_id = experiment_id_of(client, name, uri)
    mark_model_training(client, exp_id)
    _describe_once(client, exp_id, f"The {kind} of the stage runs of experiment "
                   f"[{parent.name}]({experiment_link(experiment_id)}), one run each: a run's "
                   f"page links its stage run (Parent run).")
    _describe_once(client, experiment_id, "One run per pipeline stage (`reduce-ops <stage>`); "
                   f"a stage's many runs (trials, chips, policies...) are in the experiments "
                   f"named `{parent.name}/<kind>`, linked from the stage run's description.")
    return exp_id


def _describe_once(client: Any, experiment_id: str, text: str) -> None:
    """An experiment's description (its page's), unless it has one (a user's is kept)."""
    if TAG_DESCRIPTION not in (client.get_experiment(experiment_id).tags or {}):
        client.set_experiment_tag(experiment_id, TAG_DESCRIPTION, text)


def parent_filter(run_id: str) -> str:
    """The search that finds a run's child runs (in any experiment)."""
    return f"tags.`{names.TAG_PARENT}` = '{run_id}'"


def experiment_link(experiment_id: str, search: str = "") -> str:
    """The UI address (relative: '#/...') of an experiment's runs, optionally searched."""
    query = f"searchFilter={quote(search, safe='')}&" if search else ""
    return f"#/experiments/{experiment_id}/runs?{query}{ML_VIEW}"   # (no /runs: no search)


def run_link(experiment_id: str, run_id: str) -> str:
    """The UI address (relative) of a run's page."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


def logged_model_link(experiment_id: str, model_id: str) -> str:
    """The UI address (relative) of a logged model's page."""
    return f"#/experiments/{experiment_id}/models/{model_id}"


def model_version_link(name: str, version: str) -> str:
    """The UI address (relative) of a registered model version's page."""
    return f"#/models/{quote(name, safe='')}/versions/{version}"


def clip(text: str) -> str:
    """A description cut to what a tag holds (at a line end, saying so)."""
    if len(text) <= MAX_DESCRIPTION:
        return text
    cut = text.rfind("\n", 0, MAX_DESCRIPTION - 40)
    return text[:cut if cut > 0 else MAX_DESCRIPTION - 40] + "\n\n(cut: see the artifacts)"

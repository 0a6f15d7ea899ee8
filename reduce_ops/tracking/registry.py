"""The MLflow Model Registry: one registered model per chip, its versions, tags and aliases;
downloading a version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reduce_ops.errors import TrackingError
from reduce_ops.tracking.modelrun import LoggedModel
from reduce_ops.tracking.runs import StageRun
from reduce_ops.tracking.store import client_for


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version as plain data (no mlflow types outside this module)."""

    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str]
    aliases: tuple[str, ...]


def _version_info(mv: Any) -> ModelVersionInfo:
    return ModelVersionInfo(mv.name, str(mv.version), mv.run_id or "", mv.source or "",
                            dict(mv.tags or {}), tuple(mv.aliases or ()))



def register_model_version(stage: StageRun, name: str, logged: LoggedModel, run_id: str,
                           tags: Mapping[str, Any], alias: str | None = None,
                           model_tags: Mapping[str, Any] | None = None,
                           description: str = "", version_description: str = "") -> str:
    """Register a logged model as a new version of `name` (created if new, with `model_tags` and
    `description` on the registered model itself, which the UI's models page shows), version
    tags and `version_description` (markdown on the version's page) set in the same call; the
    logged model lists the version (the UI's Models tab); `alias` (e.g. champion) then moves
    to it. Returns the version.

    No run_link: the version page shows a run_link as raw text in place of the source run's
    name (over the Source Model link); the version links its run by run id and its logged
    model by its models:/ source."""
    from mlflow.exceptions import MlflowException

    client = stage.client
    model_tags = {k: str(v) for k, v in (model_tags or {}).items()}
    with stage._timed():
        try:
            client.create_registered_model(name, tags=model_tags, description=description)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            for key, value in model_tags.items():
                client.set_registered_model_tag(name, key, value)
        mv = client.create_model_version(name, logged.model_uri, run_id=run_id,
                                         tags={k: str(v) for k, v in tags.items()},
                                         description=version_description or None,
                                         model_id=logged.model_id)
        if logged.model_id:
            _list_version_on_model(client, logged.model_id, name, str(mv.version))
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


_MODEL_VERSIONS = "mlflow.modelVersions"      # a logged model's tag: its registered versions


def _list_version_on_model(client: Any, model_id: str, name: str, version: str) -> None:
    """Add (name, version) to the logged model's `mlflow.modelVersions` tag, as
    mlflow.register_model does (the registry's own record of a version keeps no model id)."""
    import json

    listed = json.loads(client.get_logged_model(model_id).tags.get(_MODEL_VERSIONS) or "[]")
    if {"name": name, "version": version} not in listed:
        listed.append({"name": name, "version": version})
        client.set_logged_model_tags(model_id, {_MODEL_VERSIONS: json.dumps(listed)})


def delete_model_version(stage: StageRun, name: str, version: str) -> None:
    """Delete version `version` of registered model `name` (its run and files stay); its
    logged model no longer lists it."""
    import json

    client = stage.client
    with stage._timed():
        mv = client.get_model_version(name, version)
        # the registry may not return the model id it was given: the models:/m-... source has it
        source = mv.source or ""
        model_id = getattr(mv, "model_id", None) or (
            source.removeprefix("models:/") if source.startswith("models:/m-") else None)
        client.delete_model_version(name, version)
        if model_id:
            listed = json.loads(client.get_logged_model(model_id).tags.get(_MODEL_VERSIONS)
                                or "[]")
            kept = [v for v in listed if v != {"name": name, "version": str(version)}]
            if kept != listed:
                client.set_logged_model_tags(model_id, {_MODEL_VERSIONS: json.dumps(kept)})


def set_alias(stage: StageRun, name: str, alias: str, version: str) -> None:
    """Point `alias` of registered model `name` at `version`."""
    with stage._timed():
        stage.client.set_registered_model_alias(name, alias, version)


def withdraw_alias(stage: StageRun, name: str, alias: str,
                   model_tags: Mapping[str, Any]) -> None:
    """Remove `alias` from registered model `name` (if it has it) and set `model_tags` on it;
    nothing when the model was never registered."""
    from mlflow.exceptions import MlflowException

    client = stage.client
    with stage._timed():
        try:
            model = client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return
            raise
        if alias in (model.aliases or {}):
            client.delete_registered_model_alias(name, alias)
        for key, value in model_tags.items():
            client.set_registered_model_tag(name, key, str(value))


def model_version_by_alias(uri: str, name: str, alias: str) -> ModelVersionInfo | None:
    """The version of `name` that carries `alias`; None when the model or the alias is missing."""
    from mlflow.exceptions import MlflowException

    try:
        return _version_info(client_for(uri)
                             .get_model_version_by_alias(name, alias))
    except MlflowException:
        return None


def find_model_versions(uri: str, name: str,
                        tags: Mapping[str, str] | None = None) -> list[ModelVersionInfo]:
    """Versions of registered model `name` carrying all `tags`, newest first ([] if unknown)."""

    client = client_for(uri)
    filters = [f"name = '{name}'", *(f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items())]
    found = client.search_model_versions(" and ".join(filters))
    return _with_aliases(client, name, list(map(_version_info, found))) if found else []


def _with_aliases(client: Any, name: str,
                  versions: Sequence[ModelVersionInfo]) -> list[ModelVersionInfo]:
    """Versions of `name` with their aliases, newest first: search results carry no aliases,
    the registered model has them ({alias: version})."""
    from dataclasses import replace

    by_version: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    out = [replace(v, aliases=tuple(sorted(by_version.get(v.version, ())))) for v in versions]
    return sorted(out, key=lambda v: -int(v.version))


def model_versions_with_tag(uri: str, key: str, value: str) -> dict[str, list[ModelVersionInfo]]:
    """{registered model name: its versions carrying tag key=value, newest first, each with its
    aliases}, for every model in the registry: one paged search instead of one per model."""

    client = client_for(uri)
    found: dict[str, list[ModelVersionInfo]] = {}
    token = None
    while True:
        page = client.search_model_versions(f"tags.`{key}` = '{value}'", max_results=1000,
                                            page_token=token)
        for info in map(_version_info, page):
            found.setdefault(info.name, []).append(info)
        token = page.token
        if not token:
            break
    return {name: _with_aliases(client, name, versions) for name, versions in found.items()}


def registered_model_tags_of(uri: str, name: str) -> dict[str, str]:
    """The tags of registered model `name` ({} when it does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(client_for(uri).get_registered_model(name).tags or {})
    except MlflowException:
        return {}


def registered_model_tags(uri: str, key: str) -> dict[str, str]:
    """{registered model name: value of its tag `key`} for every model carrying that tag."""

    client = client_for(uri)
    found: dict[str, str] = {}
    token = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        found.update({m.name: m.tags[key] for m in page if key in (m.tags or {})})
        token = page.token
        if not token:
            return found


def _quiet_downloads() -> None:
    """No per-file progress bars on stderr (a user's own setting wins)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def download_model_version(uri: str, version: ModelVersionInfo, artifact: str,
                           dst: Path) -> tuple[Path, Path]:
    """Download a version's model directory (to dst/model) and one artifact of its run (to dst).

    Returns (model directory, artifact path).
    """
    import mlflow.artifacts

    _quiet_downloads()
    dst.mkdir(parents=True, exist_ok=True)
    model_dir = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{version.name}/{version.version}",
        dst_path=str(dst / "model"), tracking_uri=uri, registry_uri=uri))
    extra = Path(client_for(uri).download_artifacts(version.run_id, artifact, str(dst)))
    return model_dir, extra


def download_run_artifact(uri: str, run_id: str, artifact: str, dst: Path) -> Path:
    """One artifact of a run, downloaded into the folder dst."""
    from mlflow.exceptions import MlflowException

    _quiet_downloads()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client_for(uri).download_artifacts(run_id, artifact, str(dst)))
    except (MlflowException, OSError) as exc:
        raise TrackingError(f"run {run_id}: cannot download {artifact!r} from {uri} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                            ) from None

"""Model references to local bundles: ``models:/<name>@<alias>``, ``models:/<name>/<N>``, ``models:/m-<id>``
and ``runs:/<run_id>/model`` resolved against a store, downloaded once into a cache, or pulled into a folder.

Split from :mod:`medsup.tracking.registry` (which logs, registers, lists and promotes); both share
:func:`store_client` and :func:`require_model`. Downloads read the logged model's own artifact location
(``file:``, ``mlflow-artifacts:``, ``s3:`` ...), never a ``models:/`` URI, whose resolution would read MLflow's
process-global tracking URI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medsup.tracking.uri import TrackingUnavailable, call_store, is_http, short_error, store_client

log = logging.getLogger(__name__)

BUNDLE_FILES = ("weights.pt", "plan.json")
CACHE_ENV = "MEDSUP_CACHE"
COMPLETE_MARK = ".medsup-complete"
PULL_RECORD = "medsup-pull.json"

_RUNS_REF = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<name>[^/]+)/?$")
_ALIAS_REF = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_VERSION_REF = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
_LOGGED_REF = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)/?$")


def require_model(client: MlflowClient, uri: str, name: str) -> None:
    call_store(uri, f"look up {name}", lambda: client.get_registered_model(name),
          missing=f"no registered model {name!r} at {uri}")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved against a store: what to download, and its identity. Plain data (picklable):
    under torchrun rank 0 resolves a reference once and every rank downloads what it resolved, so that a
    promotion between two ranks' lookups cannot give them different models."""

    ref: str
    model_id: str | None
    download_uri: str
    name: str | None = None
    version: int | None = None

    @property
    def key(self) -> str:
        """Cache folder name: a logged model id never changes content; a plain version keeps its source."""
        return self.model_id or f"{self.name}-v{self.version}"


def resolve_bundle(uri: str, model_ref: str, cache_dir: Path | None = None) -> Path:
    """The local bundle folder (weights.pt + plan.json) of a registered or logged model.

    ``model_ref``: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/m-<id>`` or
    ``runs:/<run_id>/model`` (the run's latest logged model of that name). Aliases are resolved on every
    call; the download is cached under ``cache_dir`` (default ``$MEDSUP_CACHE/models`` or
    ``~/.cache/medsup/models``) by logged-model id, whose artifacts never change.

    Raises:
        ValueError: not an MLflow model URI; an unknown model, alias, version or run (named).
        TrackingUnavailable: the store does not answer.
    """
    return resolve_model(uri, model_ref, cache_dir)[0]


def resolve_model(uri: str, model_ref: str, cache_dir: Path | None = None) -> tuple[Path, int | None]:
    """:func:`resolve_bundle` plus the registered version the reference points at (None for a run's or
    logged model that no version was asked for), so reports can say which version ran."""
    resolved = resolve_reference(uri, model_ref)
    return fetch(uri, resolved, cache_dir), resolved.version


def resolve_reference(uri: str, model_ref: str) -> ResolvedModel:
    """What ``model_ref`` points at now (an alias read once), without downloading it.

    Raises:
        ValueError, TrackingUnavailable: as :func:`resolve_bundle`.
    """
    return _resolve(store_client(uri, must_exist=True), uri, model_ref)


def fetch(uri: str, resolved: ResolvedModel, cache_dir: Path | None = None) -> Path:
    """The local bundle folder of a resolved model, downloaded once into the cache (see :func:`resolve_bundle`).

    Raises:
        ValueError: the download holds no bundle. TrackingUnavailable: the download failed.
    """
    return _download(uri, resolved, _cache_root(cache_dir) / _uri_key(uri))


def pull(uri: str, model_ref: str, out_dir: Path) -> Path:
    """Export a model's bundle to ``out_dir`` (a plain copy, loadable without MLflow).

    ``out_dir`` must be missing, empty, or an earlier pull of the same logged model (refreshed then);
    ``medsup-pull.json`` in it records where the bundle came from.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: a bad reference (see :func:`resolve_bundle`), or ``out_dir`` holds something else.
        TrackingUnavailable: the store does not answer.
    """
    out_dir = Path(out_dir)
    resolved = resolve_reference(uri, model_ref)
    record = {"model_ref": model_ref, "tracking_uri": uri, "model_id": resolved.model_id,
              "name": resolved.name, "version": resolved.version, "source": resolved.download_uri}
    if out_dir.exists() and any(out_dir.iterdir()):
        previous = _read_pull_record(out_dir)
        same = previous is not None and previous.get("model_id") == resolved.model_id and (
            resolved.model_id is not None or previous.get("source") == resolved.download_uri)
        if not same:
            raise ValueError(f"{out_dir} is not empty and not an earlier pull of {model_ref}; "
                             "choose an empty or new folder")
    with tempfile.TemporaryDirectory(prefix="medsup-pull-") as tmp:
        bundle = _download(uri, resolved, Path(tmp))
        staged = out_dir.with_name(f".{out_dir.name}.pull-{os.getpid()}")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(bundle, staged)
        (staged / PULL_RECORD).write_text(json.dumps({**record, "pulled": _now_iso()}, indent=2) + "\n",
                                          encoding="utf-8")
        # swap in whole: a failed copy never leaves a half-written bundle in out_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(out_dir)
    log.info("pulled %s into %s", model_ref, out_dir)
    return out_dir


def logged_model_id(client: MlflowClient, uri: str, model_uri: str) -> str:
    """The logged-model id behind ``models:/m-<id>`` or ``runs:/<run_id>/<name>``."""
    if m := _LOGGED_REF.match(model_uri.strip()):
        _from_logged(client, uri, model_uri, m["model_id"])  # exists?
        return m["model_id"]
    if m := _RUNS_REF.match(model_uri.strip()):
        return _run_model_id(client, uri, m["run_id"], m["name"])
    raise ValueError(f"not a logged model URI: {model_uri!r} (expected models:/m-<id> or runs:/<run_id>/model)")


def _resolve(client: MlflowClient, uri: str, ref: str) -> ResolvedModel:
    ref = ref.strip()
    if m := _LOGGED_REF.match(ref):
        return _from_logged(client, uri, ref, m["model_id"])
    if m := _ALIAS_REF.match(ref):
        name, alias = m["name"], m["alias"]
        require_model(client, uri, name)
        mv = call_store(uri, f"resolve {ref}", lambda: client.get_model_version_by_alias(name, alias),
                   missing=f"{name} has no alias {alias!r} at {uri} ({ref})")
        return _from_version(client, uri, ref, mv)
    if m := _VERSION_REF.match(ref):
        name, number = m["name"], int(m["version"])
        require_model(client, uri, name)
        mv = call_store(uri, f"resolve {ref}", lambda: client.get_model_version(name, str(number)),
                   missing=f"{name} has no version {number} at {uri} ({ref})")
        return _from_version(client, uri, ref, mv)
    if m := _RUNS_REF.match(ref):
        model_id = _run_model_id(client, uri, m["run_id"], m["name"])
        return _from_logged(client, uri, ref, model_id)
    raise ValueError(f"not an MLflow model URI: {ref!r} (expected models:/<name>@<alias>, "
                     "models:/<name>/<version>, models:/m-<id> or runs:/<run_id>/model)")


def _from_logged(client: MlflowClient, uri: str, ref: str, model_id: str) -> ResolvedModel:
    logged = call_store(uri, f"look up {model_id}", lambda: client.get_logged_model(model_id),
                   missing=f"no logged model {model_id} at {uri} ({ref})")
    return ResolvedModel(ref, model_id, logged.artifact_location)


def _from_version(client: MlflowClient, uri: str, ref: str, mv: ModelVersion) -> ResolvedModel:
    model_id = getattr(mv, "model_id", None) or _parse_logged_id(mv.source)
    if model_id:
        return ResolvedModel(ref, model_id, _from_logged(client, uri, ref, model_id).download_uri, mv.name,
                             int(mv.version))
    where = call_store(uri, f"locate {ref}", lambda: client.get_model_version_download_uri(mv.name, mv.version))
    return ResolvedModel(ref, None, where, mv.name, int(mv.version))


def _run_model_id(client: MlflowClient, uri: str, run_id: str, name: str) -> str:
    run = call_store(uri, f"look up run {run_id}", lambda: client.get_run(run_id),
                     missing=f"no run {run_id!r} at {uri}")
    found = call_store(uri, f"search the models of run {run_id}", lambda: client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    ))
    mine = [m for m in found if m.source_run_id == run_id]
    if not mine:
        raise ValueError(f"run {run_id} at {uri} has no logged model named {name!r}")
    return str(mine[0].model_id)


def _parse_logged_id(source: str | None) -> str | None:
    m = _LOGGED_REF.match(source or "")
    return m["model_id"] if m else None


def _download(uri: str, resolved: ResolvedModel, cache: Path) -> Path:
    """Download (once) the model's artifacts under ``cache/<key>``; return its bundle folder."""
    dest = cache / resolved.key
    if (dest / COMPLETE_MARK).is_file():
        log.debug("%s: cached at %s", resolved.ref, dest)
        return _find_bundle(dest, resolved.ref)
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{resolved.key}-", dir=cache))
    try:
        # the logged model's own location (file:, mlflow-artifacts:, s3: ...), not a models:/ URI, whose
        # resolution would read the global tracking URI; mlflow-artifacts:/ resolves against tracking_uri
        mlflow.artifacts.download_artifacts(artifact_uri=resolved.download_uri, dst_path=str(staging),
                                            tracking_uri=uri)
        _find_bundle(staging, resolved.ref)  # fail before publishing a download without a bundle
        (staging / COMPLETE_MARK).write_text(json.dumps({"ref": resolved.ref, "source": resolved.download_uri}),
                                             encoding="utf-8")
        try:
            staging.rename(dest)
        except OSError:  # another process published the same model first: use theirs
            if not (dest / COMPLETE_MARK).is_file():
                raise
    except MlflowException as err:
        raise TrackingUnavailable(f"{uri}: downloading {resolved.ref} from {resolved.download_uri} failed: "
                                  f"{short_error(err)}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _find_bundle(dest, resolved.ref)


def _find_bundle(root: Path, ref: str) -> Path:
    """The bundle folder inside a downloaded pyfunc model: from the MLmodel file, else by its files."""
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        conf = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        rel = (conf.get("flavors", {}).get("python_function", {}).get("artifacts", {})
               .get("bundle", {}).get("path"))
        if rel and all((root / rel / f).is_file() for f in BUNDLE_FILES):
            return root / rel
    found = sorted(p.parent for p in root.rglob(BUNDLE_FILES[0]) if (p.parent / BUNDLE_FILES[1]).is_file())
    if not found:
        raise ValueError(f"{ref} holds no medsup bundle (no folder with {' + '.join(BUNDLE_FILES)})")
    return found[0]


def _read_pull_record(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / PULL_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "medsup") / "models"


def _uri_key(uri: str) -> str:
    """A short folder name per store, so two stores' models never share a cache entry."""
    kind = "http" if is_http(uri) else uri.split(":", 1)[0]
    return f"{kind}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

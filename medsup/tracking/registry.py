"""The model registry: log a bundle as an MLflow pyfunc model, register, list, promote.

A trained bundle (``model/``: weights.pt, config.json, plan.json, labels.json, versions.json) is logged
to its training run as a **models-from-code** pyfunc model named ``model`` (:mod:`.pyfunc_model`, the
medsup package as ``code_paths``, pinned pip requirements: nothing pickled, nothing inferred), then
registered as a version of ``medsup-<task>`` with the alias ``candidate``; :func:`promote` moves
``champion``. :mod:`.resolve` turns ``models:/medsup-liver@champion``, ``models:/medsup-liver/3``,
``models:/m-<id>`` or ``runs:/<run_id>/model`` into a local bundle folder (downloaded once, cached).

MLflow 3 notes that shaped this module:

- A logged model is a LoggedModel (``models:/m-<id>``) stored under the experiment's artifact root
  (``<root>/models/m-<id>/artifacts``), not in the run's artifacts. :func:`log_bundle_model` creates it
  in the run's experiment itself: left to MLflow, a call without an active fluent run puts it in the
  *default* experiment.
- ``mlflow.models.Model.log(run_id=...)`` links the model to a run without ``mlflow.start_run``, whose
  resume-and-end would flip a RUNNING run to FINISHED (and rewrite a finished run's end time) under a
  :class:`~medsup.tracking.runs.RunTracker` that still owns it. The run's status is never touched here.
- ``Model.log``, ``models:/`` downloads (so they are avoided: the logged model's artifact location is
  downloaded instead) and a SQLite registry creating a version from a ``models:/m-<id>`` source read
  MLflow's process-global tracking URI, whatever client is passed; :func:`_global_tracking_uri`
  sets it for the duration of such a call and restores it (and ``$MLFLOW_TRACKING_URI``) afterwards, one
  thread at a time. Everything else uses an explicit ``MlflowClient(uri)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from medsup.tracking.batching import is_permanent
from medsup.tracking.resolve import (
    BUNDLE_FILES,
    logged_model_id,
    require_model,
)
from medsup.tracking.uri import (
    TrackingUnavailable,
    call_store,
    short_error,
    store_client,
    store_error,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_NAME = "model"  # the logged model's name: runs:/<run_id>/model
MODEL_PREFIX = "medsup-"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # medsup/: shipped as code_paths

# Distributions the pyfunc model needs, pinned to the running versions. torch's local label (+cpu,
# +cu124) is dropped: PyPI has no such files, and a serving host picks its own build of that version.
REQUIREMENTS = ("torch", "monai", "nibabel", "SimpleITK", "pytorch-ignite", "mlflow", "numpy", "scipy",
                "pydantic", "pyyaml")

# No input schema: inputs are paths as a list or a DataFrame (see pyfunc_model), which one column schema
# cannot describe. The params schema is what lets `output_dir` through: MLflow drops params a model's
# signature does not declare. "" means unset (a ParamSpec needs a default).
SIGNATURE = ModelSignature(
    inputs=None,
    outputs=Schema([ColSpec("string", name) for name in ("input", "output", "status", "error")]),
    params=ParamSchema([ParamSpec("output_dir", "string", "")]),
)


def model_name(task: str) -> str:
    """The registered model of a task: ``medsup-<task>``."""
    return f"{MODEL_PREFIX}{task}"


def pinned_requirements() -> list[str]:
    """``dist==version`` for :data:`REQUIREMENTS`, from the running environment (no inference, no network)."""
    pins = []
    for dist in REQUIREMENTS:
        try:
            pins.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            log.warning("%s is not installed; the model's requirements list it unpinned", dist)
            pins.append(dist)
    return pins


# ----------------------------------------------------------------------------------------- logging


def log_bundle_model(uri: str, run_id: str, bundle_dir: Path) -> str:
    """Log ``bundle_dir`` to run ``run_id`` as the pyfunc model ``model`` (models-from-code).

    Safe on a run that a :class:`~medsup.tracking.runs.RunTracker` still has open: the run's status and
    end time are left as they are (see the module docstring). The process-global MLflow tracking URI is
    switched to ``uri`` while the model is written, then restored.

    Returns:
        The logged model's URI, ``models:/m-<id>``: pass it to :func:`register`.

    Raises:
        ValueError: ``bundle_dir`` is not a bundle, or the run does not exist.
        TrackingUnavailable: the store does not answer.
    """
    bundle_dir = Path(bundle_dir).resolve()
    missing = [name for name in BUNDLE_FILES if not (bundle_dir / name).is_file()]
    if missing:
        raise ValueError(f"{bundle_dir} is not a model bundle: {', '.join(missing)} missing")
    client = store_client(uri)
    run = call_store(uri, f"look up run {run_id}", lambda: client.get_run(run_id),
                     missing=f"no run {run_id!r} at {uri}")
    task = _bundle_task(bundle_dir)
    logged = call_store(uri, "create a logged model", lambda: client.create_logged_model(
        experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
        tags={"medsup.task": task, "medsup.bundle": bundle_dir.name}, model_type="medsup-bundle",
    ))
    started = time.perf_counter()
    with _global_tracking_uri(uri), warnings.catch_warnings():
        # paths in, files out: an input example would have to be a real image; the signature documents it
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        try:
            info = Model.log(
                artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                python_model=str(PYFUNC_FILE), artifacts={"bundle": str(bundle_dir)},
                code_paths=[str(PACKAGE_DIR)], pip_requirements=pinned_requirements(), signature=SIGNATURE,
            )
        except MlflowException as err:
            if is_permanent(err):
                raise ValueError(f"MLflow refused to log {bundle_dir} to run {run_id}: {err}") from err
            raise TrackingUnavailable(f"{uri}: logging the model of run {run_id} failed: {short_error(err)}") from err
    log.info("logged %s to run %s as %s in %.1f s", bundle_dir, run_id, info.model_uri,
             time.perf_counter() - started)
    return str(info.model_uri)


def register(uri: str, run_id: str, task: str, model_uri: str, val_dice: float | None,
             alias: str = "candidate") -> int:
    """Register ``model_uri`` as a new version of ``medsup-<task>`` and point ``alias`` at it.

    The version is tagged ``run_id``, ``task`` and (when known) ``val_dice``.

    Args:
        model_uri: what :func:`log_bundle_model` returned (``models:/m-<id>``), or ``runs:/<run_id>/model``.

    Returns:
        The new version number.

    Raises:
        ValueError: an unknown logged model or run, a refused name or alias.
        TrackingUnavailable: the store does not answer.
    """
    client = store_client(uri)
    name = model_name(task)
    model_id = logged_model_id(client, uri, model_uri)
    source = f"models:/{model_id}"
    try:
        client.create_registered_model(name, description=f"medsup {task} segmentation bundles")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # else: a later version of a known model
            raise store_error(uri, f"create {name}", err) from err
    tags = {"run_id": run_id, "task": task}
    if val_dice is not None:
        tags["val_dice"] = repr(float(val_dice))
    # a SQLite registry resolves a models:/ source with MLflow's *global* client (an MLflow TODO)
    with _global_tracking_uri(uri):
        mv = call_store(uri, f"register {source} as {name}", lambda: client.create_model_version(
            name=name, source=source, run_id=run_id, tags=tags, model_id=model_id,
        ))
    call_store(uri, f"set alias {alias}", lambda: client.set_registered_model_alias(name, alias, mv.version))
    _link_version(client, model_id, name, int(mv.version))
    log.info("registered %s as %s version %s (@%s)", source, name, mv.version, alias)
    return int(mv.version)


def with_patience(action: Callable[[], T], patience_s: float, what: str, max_backoff_s: float = 15.0,
                  first_delay_s: float = 1.0) -> T:
    """Run ``action``, retrying with backoff (1, 2, 4 ... s, capped) while the store is unavailable
    (:class:`TrackingUnavailable`), for up to ``patience_s``; other errors and the last failure propagate.

    For the end of a training: the metrics outbox already rides out an outage of that length, and the
    model must not be the one thing lost to it.
    """
    deadline = time.monotonic() + patience_s
    delay = first_delay_s
    while True:
        try:
            return action()
        except TrackingUnavailable as err:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("could not %s (%s); retrying in %.0f s", what, short_error(err), delay)
            time.sleep(delay)
            delay = min(delay * 2, max_backoff_s)


def _link_version(client: MlflowClient, model_id: str, name: str, number: int) -> None:
    """Record the version on the logged model, as ``mlflow.register_model`` does (the UI shows it)."""
    try:
        logged = client.get_logged_model(model_id)
        known = json.loads(logged.tags.get("mlflow.modelVersions") or "[]")
        known.append({"name": name, "version": str(number)})
        client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(known)})
    except Exception as err:  # cosmetic: the version exists whatever happens here
        log.warning("could not link %s version %d to logged model %s: %s", name, number, model_id, err)


# ----------------------------------------------------------------------------------------- registry


def list_models(uri: str, task: str | None = None) -> list[dict[str, Any]]:
    """Versions of ``medsup-<task>`` (or of every ``medsup-*`` model), sorted by name and version.

    Returns:
        One dict per version: ``name``, ``version`` (int), ``aliases`` (sorted), ``val_dice`` (float or
        None), ``run_id``, ``created`` (ISO 8601, UTC), ``status`` (``READY`` once usable).

    Raises:
        ValueError: a SQLite store that does not exist.
        TrackingUnavailable: the store does not answer.
    """
    client = store_client(uri, must_exist=True)
    query = f"name = '{model_name(task)}'" if task else f"name LIKE '{MODEL_PREFIX}%'"
    versions: list[ModelVersion] = []
    token: str | None = None
    while True:
        page = call_store(uri, "search model versions", partial(client.search_model_versions, query, page_token=token))
        versions.extend(page)
        token = page.token
        if not token:
            break
    aliases: dict[tuple[str, int], list[str]] = {}
    for name in sorted({mv.name for mv in versions}):
        registered = call_store(uri, f"read {name}", partial(client.get_registered_model, name))
        for alias, number in (registered.aliases or {}).items():
            aliases.setdefault((name, int(number)), []).append(alias)
    rows = [{
        "name": mv.name,
        "version": int(mv.version),
        "aliases": sorted(aliases.get((mv.name, int(mv.version)), [])),
        "val_dice": _float(mv.tags.get("val_dice")),
        "run_id": mv.run_id or mv.tags.get("run_id"),
        "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc).isoformat(
            timespec="seconds"),
        "status": mv.status,
    } for mv in versions]
    return sorted(rows, key=lambda r: (r["name"], r["version"]))


def promote(uri: str, task: str, version: int, alias: str = "champion") -> None:
    """Point ``alias`` of ``medsup-<task>`` at ``version`` (moving it off any other version).

    Raises:
        ValueError: no such model or version.
        TrackingUnavailable: the store does not answer.
    """
    client = store_client(uri, must_exist=True)
    name = model_name(task)
    call_store(uri, f"look up {name} version {version}", lambda: client.get_model_version(name, str(version)),
          missing=f"{name} has no version {version} at {uri}")
    call_store(uri, f"set alias {alias}", lambda: client.set_registered_model_alias(name, alias, str(version)))
    log.info("%s@%s -> version %d", name, alias, version)


def best_version(uri: str, task: str, metric: str = "val_dice", experiment: str | None = None) -> tuple[int, float]:
    """The version of ``medsup-<task>`` with the highest ``metric`` (``promote --best``).

    ``metric`` is read from the version's tag of that name (training tags ``val_dice``: the best validation
    Dice of its run), else from the source run's metric of that name (its last value, e.g. ``val.dice.tumour``
    or an ``eval.dice.liver.mean`` logged by ``medsup evaluate --log-to``). Versions without it are skipped.
    A tie goes to the newest version.

    Args:
        experiment: only versions whose source run belongs to this MLflow experiment (e.g. one pipeline's
            folds, not every model ever trained on the store).

    Returns:
        ``(version, value)``.

    Raises:
        ValueError: no such model, experiment, or no version carries the metric.
        TrackingUnavailable: the store does not answer.
    """
    client = store_client(uri, must_exist=True)
    name = model_name(task)
    require_model(client, uri, name)
    experiment_id = None
    if experiment is not None:
        exp = call_store(uri, f"look up experiment {experiment}", lambda: client.get_experiment_by_name(experiment))
        if exp is None:
            raise ValueError(f"no experiment {experiment!r} at {uri}")
        experiment_id = exp.experiment_id
    scored: list[tuple[float, int]] = []
    for row in list_models(uri, task):
        need_run = experiment_id is not None or metric != "val_dice"
        run = call_store(uri, f"look up run {row['run_id']}", partial(client.get_run, row["run_id"]),
                    missing=f"no run {row['run_id']!r} at {uri}") if need_run and row["run_id"] else None
        if experiment_id is not None and (run is None or run.info.experiment_id != experiment_id):
            continue
        value = row["val_dice"] if metric == "val_dice" else None
        if value is None and metric != "val_dice":
            mv = call_store(uri, f"read {name} version {row['version']}",
                       partial(client.get_model_version, name, str(row["version"])))
            value = _float(mv.tags.get(metric))
        if value is None and run is not None:
            value = run.data.metrics.get(metric)
        if value is not None and math.isfinite(value):  # NaN never wins
            scored.append((float(value), row["version"]))
    if not scored:
        where = f" from runs of experiment {experiment!r}" if experiment else ""
        raise ValueError(f"no version of {name}{where} at {uri} has {metric!r} (a version tag or a run metric)")
    value, number = max(scored)
    return number, value


# ----------------------------------------------------------------------------------------- resolving


def resolve_version(uri: str, task: str, alias: str) -> int:
    """The version number ``medsup-<task>@<alias>`` points at (ValueError naming it when unset)."""
    client = store_client(uri, must_exist=True)
    name = model_name(task)
    require_model(client, uri, name)
    mv = call_store(uri, f"resolve {name}@{alias}", lambda: client.get_model_version_by_alias(name, alias),
               missing=f"{name} has no alias {alias!r} at {uri}")
    return int(mv.version)


# ----------------------------------------------------------------------------------------- helpers


# one thread at a time in _global_tracking_uri: two registrations to different stores from threads of one
# process (a service) would otherwise log or register into whichever store was set last
_GLOBAL_URI_LOCK = threading.RLock()


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at ``uri`` for a call that reads only that.

    MLflow's own ``_use_tracking_uri`` restores ``None`` by deleting ``$MLFLOW_TRACKING_URI``; the
    variable is put back here as it was. medsup's own callers wait for each other (a lock); MLflow
    fluent-API calls of other code in the process, which do not take it, can still see ``uri`` meanwhile.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        old_uri = tracking_utils._tracking_uri
        old_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old_uri)  # type: ignore[arg-type]  # None means "unset", as MLflow keeps it
            if old_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_env


def _bundle_task(bundle_dir: Path) -> str:
    try:
        return str(json.loads((bundle_dir / "config.json").read_text(encoding="utf-8")).get("task", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None



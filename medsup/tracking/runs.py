"""One MLflow run per training, resilient to a tracking server that drops mid-run.

The training thread never talks to the network. ``log_*`` calls append to an in-memory queue and to the
spool file (:mod:`medsup.tracking.spool`), and return. A background thread (:mod:`medsup.tracking.outbox`)
sends the queue with ``log_batch`` every ``flush_interval_s`` seconds or ``flush_points`` records.

Outages. When a send fails the records stay queued (and spooled) and the thread retries with exponential
backoff (1, 2, 4 ... s, capped at ``max_backoff_s``); training goes on for as long as the outage lasts.
:meth:`RunTracker.finish` keeps retrying for up to ``outage_tolerance_s`` (default 300 s) and then ends
the run. If the server is still away it gives up without raising: the spool file keeps every unconfirmed
record and an ERROR says how to replay it (``python -m medsup.tracking replay FILE``). A resumed run
replays the spools its earlier sessions left in ``spool_dir`` first.

Artifacts are uploaded from their local paths when their turn comes: a file rewritten in the meantime
(``last.pt``) is uploaded as it is then. :meth:`RunTracker.log_dict` writes its JSON into the spool
directory, so it survives until sent.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from medsup.tracking.batching import MAX_PARAM_LENGTH, MAX_TAG_LENGTH, Item, is_permanent, sanitize_key, truncate
from medsup.tracking.outbox import Outbox
from medsup.tracking.spool import Spool, read_spool, replay_spool, spool_files
from medsup.tracking.uri import TrackingUnavailable, prepare_store, short_error, sqlite_path

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
OUTPUT_DIR_TAG = "medsup.output_dir"  # set by train.py; read back by run_output_dir


def param_str(value: object) -> str:
    """MLflow param text: strings as they are, containers as sorted JSON, the rest via ``str``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def artifact_dir(spool_file: Path) -> Path:
    """Where a session keeps the files it made for upload (log_dict), next to its spool file."""
    return spool_file.with_name(spool_file.stem + "-artifacts")


def ensure_experiment(client: MlflowClient, uri: str, experiment: str) -> str:
    """The id of ``experiment`` at ``uri``, created if missing (a SQLite store keeps its artifacts in
    ``mlartifacts/`` beside the database, not in the working directory).

    Raises:
        ValueError: the experiment exists but is deleted.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        db = sqlite_path(uri)
        location = (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None
        try:
            return str(client.create_experiment(experiment, artifact_location=location))
        except Exception as err:
            if not is_permanent(err):  # another process may have created it in between
                raise
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return str(found.experiment_id)
    if exp.lifecycle_stage == "deleted":
        raise ValueError(f"experiment {experiment!r} is deleted at {uri}; restore it or choose another name")
    return str(exp.experiment_id)


class RunTracker:
    """One MLflow run: params, tags, buffered metrics and artifacts, resumable, outage tolerant.

    Args:
        uri: tracking URI (see :func:`~medsup.tracking.uri.resolve_tracking_uri`); never a file store.
        experiment: experiment name, created if missing (a SQLite store keeps artifacts in
            ``mlartifacts/`` beside the database instead of MLflow's ``./mlruns`` default). When resuming,
            None means the run's own experiment (a run cannot move; a name that differs is only warned about).
        run_name: the new run's name (``mlflow.runName``); ignored when resuming.
        run_id: resume this run: same id, status back to RUNNING, new points appended.
        spool_dir: where the spool file of this session lives.
        enabled: False gives a no-op tracker (non-zero DDP ranks): nothing is created, ``run_id`` is None.
        outage_tolerance_s: how long :meth:`finish` keeps retrying an unreachable store.
        flush_interval_s: the longest a logged record waits in memory while the store is up.
        flush_points: queued records that trigger a send before the interval ends.
        max_backoff_s: the longest wait between two attempts while the store is down.
        max_buffered: records kept in memory during an outage; beyond it records are only spooled and
            are replayed from the spool at :meth:`finish`.

    Raises:
        TrackingUnavailable: the store cannot create or resume the run.
        ValueError: a file-store URI, an unknown or deleted ``run_id``, a deleted experiment, no experiment
            for a new run.
    """

    def __init__(self, uri: str, experiment: str | None, run_name: str, *, run_id: str | None = None,
                 spool_dir: Path, enabled: bool = True, outage_tolerance_s: float = 300.0,
                 flush_interval_s: float = 5.0, flush_points: int = 500, max_backoff_s: float = 60.0,
                 max_buffered: int = 100_000) -> None:
        if run_id is None and experiment is None:
            raise ValueError("a new run needs an experiment name")
        self.uri = uri
        self.enabled = enabled
        self.run_id: str | None = None
        self.outage_tolerance_s = outage_tolerance_s
        self._params: dict[str, str] = {}
        self._finished = not enabled
        self._outbox: Outbox | None = None
        if not enabled:
            return

        prepare_store(uri)
        self._client = MlflowClient(tracking_uri=uri)
        action = "resume run " + run_id if run_id else f"create a run in experiment {experiment!r}"
        try:
            if run_id:
                run, experiment = self._resume(run_id, experiment, Path(spool_dir))
            else:
                run = self._create(str(experiment), run_name)
        except ValueError:
            raise
        except Exception as err:
            raise TrackingUnavailable(f"{uri}: cannot {action}: {err}") from err
        self.run_id = run.info.run_id
        spool = Spool.for_run(Path(spool_dir), self.run_id,
                              {"uri": uri, "experiment": experiment, "run_name": run.info.run_name})
        self._outbox = Outbox(self._client, self.run_id, spool, flush_interval_s=flush_interval_s,
                              flush_points=flush_points, max_backoff_s=max_backoff_s, max_buffered=max_buffered)
        log.info("MLflow run %s (%s) %s at %s", self.run_id, run.info.run_name,
                 "resumed" if run_id else "started", uri)

    # ----------------------------------------------------------------------------------- run lifecycle

    def _create(self, experiment: str, run_name: str) -> Run:
        experiment_id = ensure_experiment(self._client, self.uri, experiment)
        return self._client.create_run(experiment_id, run_name=run_name, tags=_context_tags())

    def _resume(self, run_id: str, experiment: str | None, spool_dir: Path) -> tuple[Run, str]:
        try:
            run = self._client.get_run(run_id)
        except Exception as err:
            if is_permanent(err):
                raise ValueError(f"cannot resume run {run_id}: not found at {self.uri} ({err})") from err
            raise
        if run.info.lifecycle_stage == "deleted":
            raise ValueError(f"cannot resume run {run_id}: it is deleted at {self.uri}")
        exp = self._client.get_experiment(run.info.experiment_id)
        if experiment is not None and exp.name != experiment:
            log.warning("resuming run %s of experiment %r, not %r", run_id, exp.name, experiment)
        self._params = dict(run.data.params)
        for leftover in spool_files(spool_dir, run_id):
            # an earlier session of this run lost its server or died: send what it could not
            try:
                replay_spool(leftover, self.uri)
            except Exception as err:
                log.warning("could not replay %s (%s); it stays for a later attempt", leftover, err)
                continue
            if not read_spool(leftover)[1]:
                leftover.unlink()
                shutil.rmtree(artifact_dir(leftover), ignore_errors=True)
        self._client.update_run(run_id, status="RUNNING")
        return self._client.get_run(run_id), exp.name

    def finish(self, status: str = "FINISHED") -> None:
        """Send everything, then end the run with ``status`` (FINISHED, FAILED or KILLED). Never raises.

        Retries an unreachable store for up to ``outage_tolerance_s``. If it stays away, the spool file is
        kept and an ERROR names it with the command that replays it. A second call does nothing.
        """
        if self._finished:
            return
        self._finished = True
        try:
            if status not in RUN_STATUSES:
                log.warning("unknown run status %r, using FAILED", status)
                status = "FAILED"
            assert self._outbox is not None
            self._outbox.put([Item(0, "end", value=status, timestamp=_now_ms())], cap=False)
            if self._outbox.down:
                log.warning("MLflow store %s is down; waiting up to %g s to send %d record(s) of run %s "
                            "(interrupting keeps them in %s)", self.uri, self.outage_tolerance_s, self.pending,
                            self.run_id, self._outbox.spool.path)
            self._close(self._outbox.drain(self.outage_tolerance_s))
        except (KeyboardInterrupt, SystemExit):
            # a second Ctrl-C while waiting for the server: say where the data is, then let it through
            self._report_unsent()
            raise
        except Exception:
            log.exception("MLflow run %s: ending the run failed", self.run_id)
            self._report_unsent()

    def _close(self, left: int) -> None:
        assert self._outbox is not None
        outbox, spool = self._outbox, self._outbox.spool
        spool.close()
        if left == 0 and outbox.overflow:
            try:  # records that did not fit in memory during a long outage are only in the spool
                replay_spool(spool.path, self.uri)
                outbox.overflow = len(read_spool(spool.path)[1])
            except Exception as err:
                log.warning("replaying the overflow of %s failed: %s", spool.path, err)
        if left == 0 and not outbox.overflow:
            spool.remove()
            shutil.rmtree(artifact_dir(spool.path), ignore_errors=True)
            log.info("MLflow run %s ended, everything sent to %s", self.run_id, self.uri)
        else:
            self._report_unsent()

    def _report_unsent(self) -> None:
        if self._outbox is None:
            return
        path = self._outbox.spool.path
        log.error(
            "MLflow run %s: %d record(s) could not be sent to %s within %g s; they are kept in %s. "
            "Once the server is back, replay them with: python -m medsup.tracking replay %s --uri %s",
            self.run_id, self.pending, self.uri, self.outage_tolerance_s, path, path, self.uri,
        )

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # ----------------------------------------------------------------------------------- logging API

    def log_params(self, params: dict[str, object]) -> None:
        """Log params as strings (containers as JSON), keys sanitised, values cut at 6000 characters.

        MLflow refuses to change a param: a key already logged (in this session or, on resume, in an
        earlier one) with the same value is skipped silently, with a different value skipped with a warning.
        """
        if not self._accepting("log_params"):
            return
        items = []
        for raw_key, raw_value in params.items():
            key, value = self._key(raw_key), param_str(raw_value)
            if len(value) > MAX_PARAM_LENGTH:
                log.warning("param %s is %d characters long; cut to MLflow's %d", key, len(value), MAX_PARAM_LENGTH)
                value = truncate(value, MAX_PARAM_LENGTH)
            old = self._params.get(key)
            if old == value:
                continue
            if old is not None:
                log.warning("param %s was %r and is now %r; MLflow keeps a param's first value, not logged",
                            key, old, value)
                continue
            self._params[key] = value
            items.append(Item(0, "param", key=key, value=value))
        self._put(items)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set tags (values as strings, cut at 8000 characters); a later value replaces an earlier one."""
        if not self._accepting("set_tags"):
            return
        self._put([Item(0, "tag", key=self._key(k), value=truncate(str(v), MAX_TAG_LENGTH)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue metric points at ``step`` (one timestamp for the call); returns at once.

        NaN and infinite values are logged as they are: a diverging loss is worth seeing in the UI.

        Raises:
            TypeError: a value that is not a number (floats, ints, 0-d tensors and numpy scalars are).
        """
        if not self._accepting("log_metrics"):
            return
        stamp = _now_ms()
        items = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"metric {key!r}: {value!r} is not a number") from err
            if not math.isfinite(number):
                log.debug("metric %s=%s at step %d", key, number, step)
            items.append(Item(0, "metric", key=self._key(key), value=number, step=int(step), timestamp=stamp))
        self._put(items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Queue a file or directory for upload under ``artifact_path``; retried like metrics.

        Raises:
            FileNotFoundError: ``path`` does not exist now.
        """
        if not self._accepting("log_artifact"):
            return
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        self._put([Item(0, "artifact", path=str(path), artifact_path=artifact_path)], cap=False)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """Log ``data`` as the JSON artifact ``name`` (e.g. ``"config.json"`` or ``"plan/plan.json"``).

        Raises:
            ValueError: ``name`` is absolute or leaves the artifact root.
        """
        if not self._accepting("log_dict"):
            return
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.name:
            raise ValueError(f"artifact name {name!r} must be a relative path inside the run's artifacts")
        assert self._outbox is not None
        dest = artifact_dir(self._outbox.spool.path) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
        parent = str(rel.parent)
        self._put([Item(0, "artifact", path=str(dest), artifact_path=None if parent == "." else parent)],
                      cap=False)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send what is pending now, skipping any backoff wait; True when nothing is left.

        Returns early (False) when an attempt fails: during an outage this costs one attempt, not a wait.
        """
        return True if self._outbox is None else self._outbox.flush(timeout_s)

    @property
    def pending(self) -> int:
        """Records not yet confirmed by the store (queued in memory or, past the memory cap, only spooled)."""
        return 0 if self._outbox is None else self._outbox.pending

    # ----------------------------------------------------------------------------------- internals

    def _accepting(self, what: str) -> bool:
        if not self.enabled:
            return False
        if self._finished:
            log.warning("MLflow run %s is finished; %s ignored", self.run_id, what)
            return False
        return True

    def _key(self, raw: object) -> str:
        key = sanitize_key(raw)
        if key != raw:
            log.debug("MLflow key %r logged as %r", raw, key)
        return key

    def _put(self, items: list[Item], cap: bool = True) -> None:
        assert self._outbox is not None
        self._outbox.put(items, cap)


def run_output_dir(uri: str, run_id: str) -> Path:
    """The output folder a training recorded in its run's ``medsup.output_dir`` tag (for ``--resume RUN_ID``).

    Raises:
        ValueError: the run does not exist at ``uri`` or has no such tag.
        TrackingUnavailable: the store does not answer.
    """
    prepare_store(uri)
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as err:
        if is_permanent(err):
            raise ValueError(f"no run {run_id} at {uri}") from err
        raise TrackingUnavailable(f"{uri}: cannot look up run {run_id}: {short_error(err)}") from err
    folder = run.data.tags.get(OUTPUT_DIR_TAG)
    if not folder:
        raise ValueError(f"run {run_id} at {uri} has no {OUTPUT_DIR_TAG} tag")
    return Path(folder)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000




def _context_tags() -> dict[str, str]:
    """MLflow's standard source tags (mlflow.user, mlflow.source.name/type, git commit), as the fluent API sets."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {str(k): str(v) for k, v in resolve_tags({}).items()}
    except Exception as err:  # a broken context provider must not stop a training
        log.debug("MLflow context tags unavailable: %s", err)
        return {}

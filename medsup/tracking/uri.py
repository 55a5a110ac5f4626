"""Where runs are tracked: URI precedence, file-store rejection, a bounded reachability probe.

HTTP timeouts. MLflow's REST client retries a failed request up to 7 times with exponential backoff and a
120 s read timeout, so one call against a dead server can hang for minutes. :func:`apply_http_defaults`
(called by :func:`check_reachable` and :class:`~medsup.tracking.runs.RunTracker` for http(s) URIs) sets
these environment variables, which MLflow reads on every request, but ONLY where the user has not set them:

    MLFLOW_HTTP_REQUEST_MAX_RETRIES=1      one immediate retry (a refused connection fails in milliseconds)
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1
    MLFLOW_HTTP_REQUEST_TIMEOUT=20         seconds per connect/read, not per upload; a black-holed host
                                           fails an attempt in ~40 s, on the tracker's background thread

They are process-wide (MLflow offers no per-client setting); the tracker does its own retrying with
backoff and a local spool, so MLflow's long retry storms buy nothing here. Export any of them to override.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

HTTP_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


T = TypeVar("T")


class TrackingUnavailable(RuntimeError):  # noqa: N818 (name fixed by the training loop's API)
    """The tracking store cannot be reached or opened; the message names the URI and the reason."""


def resolve_tracking_uri(cli_uri: str | None, cfg_uri: str | None, output_dir: Path) -> tuple[str, str]:
    """Pick the tracking URI.

    Precedence: ``--tracking-uri``, then ``$MLFLOW_TRACKING_URI``, then ``cfg.tracking.uri``, else
    ``sqlite:///<output_dir>/mlflow.db`` (absolute). Empty strings count as unset.

    Returns:
        ``(uri, source)``; source is ``"--tracking-uri"``, ``"MLFLOW_TRACKING_URI"``, ``"config"`` or
        ``"default"``.

    Raises:
        ValueError: the winning URI is a plain path or ``file:`` URI (MLflow's deprecated file store).
    """
    candidates = (
        (cli_uri, "--tracking-uri"),
        (os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI"),
        (cfg_uri, "config"),
    )
    for uri, source in candidates:
        if uri and uri.strip():
            uri = uri.strip()
            validate_uri(uri, source)
            return uri, source
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}", "default"


def validate_uri(uri: str, source: str = "tracking URI") -> None:
    """Reject the file store: plain paths and ``file:`` URIs (a Windows drive letter parses as a scheme)."""
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:
        raise ValueError(
            f"{source}: {uri!r} is a file store, which MLflow has deprecated; use a database such as "
            f"sqlite:///{Path(uri.removeprefix('file://')).resolve() / 'mlflow.db'} or a server http://HOST:PORT"
        )


def is_http(uri: str) -> bool:
    """True for a tracking server (http or https)."""
    return urlparse(uri).scheme.lower() in ("http", "https")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, None for other URIs or an in-memory database."""
    if not uri.lower().startswith("sqlite:"):
        return None
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    path = path.split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def apply_http_defaults() -> None:
    """Set MLflow's HTTP retry/timeout variables to fail-fast values where the user left them unset."""
    for name, value in HTTP_DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            log.debug("set %s=%s (fail fast; the tracker retries and spools on its own)", name, value)


def prepare_store(uri: str) -> None:
    """Per-URI set-up before the first MLflow call: fail-fast HTTP settings, the SQLite file's directory."""
    validate_uri(uri)
    if is_http(uri):
        apply_http_defaults()
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingUnavailable(f"{uri}: cannot create the database directory {db.parent}: {err}") from err


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before training, when the tracking store does not answer.

    Makes one real API call (search one experiment), so authentication and a wrong path prefix are caught
    too. A remote store gets ``timeout_s`` for it; the call runs on a daemon thread so MLflow's own retry
    settings cannot stretch the wait. A SQLite store is created (with its directory) if missing; creating
    its tables can take seconds on a slow disk, so it gets no deadline.

    Raises:
        TrackingUnavailable: naming the URI and the reason.
        ValueError: a file-store URI.
    """
    prepare_store(uri)

    def probe() -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)

    if sqlite_path(uri) is not None:
        try:
            probe()
        except Exception as err:
            raise TrackingUnavailable(f"{uri}: cannot open or create the SQLite store: {err}") from err
        return

    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            probe()
            outcome.append(None)
        except BaseException as err:  # handed to the caller's thread below
            outcome.append(err)

    thread = threading.Thread(target=target, name="medsup-mlflow-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise TrackingUnavailable(f"{uri}: no answer within {timeout_s:g} s (is the tracking server running?)")
    failure = outcome[0]
    if failure is not None:
        raise TrackingUnavailable(f"{uri}: tracking server not usable: {short_error(failure)}") from failure
    log.debug("tracking store %s answers", uri)


def short_error(err: BaseException, limit: int = 300) -> str:
    """``err`` on one line, at most ``limit`` characters (MLflow's errors carry whole HTTP bodies)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def call_store(uri: str, what: str, fn: Callable[[], T], missing: str | None = None) -> T:
    """Run one MLflow call: a refusal is a ValueError (``missing`` when given), anything else unavailability
    (see :func:`store_error`)."""
    from mlflow.exceptions import MlflowException

    try:
        return fn()
    except (MlflowException, OSError) as err:
        raise store_error(uri, what, err, missing) from err


def store_error(uri: str, what: str, err: Exception, missing: str | None = None) -> Exception:
    """A refusal by the store (bad name, not found) as ValueError, anything else as TrackingUnavailable; the
    message names ``uri`` and ``what`` was being done."""
    from mlflow.exceptions import MlflowException

    from medsup.tracking.batching import is_permanent

    if isinstance(err, MlflowException) and (is_permanent(err) or err.error_code == "NOT_FOUND"):
        return ValueError(missing or f"{uri}: cannot {what}: {short_error(err)}")
    return TrackingUnavailable(f"{uri}: cannot {what}: {short_error(err)}")


def store_client(uri: str, must_exist: bool = False) -> MlflowClient:
    """A client bound to ``uri``; for reads, a SQLite store must already exist (do not create one)."""
    prepare_store(uri)
    db = sqlite_path(uri)
    if must_exist and db is not None and not db.is_file():
        raise ValueError(f"no MLflow store at {uri} ({db} does not exist)")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)

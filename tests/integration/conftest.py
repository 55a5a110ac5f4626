"""Integration fixtures: a real ``mlflow server`` on 127.0.0.1 (SQLite backend unless told otherwise,
proxied artifacts in tmp).

Start-up costs ~10 s on 2 cores (mlflow's CLI, then a uvicorn worker importing the app), so
:func:`mlflow_server` is one server for the whole session; tests that must kill or restart a server get
their own from :func:`mlflow_server_factory`. Every server runs in its own process group and is killed as a group
(the CLI, its uvicorn worker), at fixture teardown and again, as a safety net, at session end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

_STARTED: list[MlflowServer] = []


def pytest_configure(config: pytest.Config) -> None:
    # MLflow 3 sends usage telemetry by default; tests must not reach beyond 127.0.0.1
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    config.addinivalue_line("markers", "mlflow_server: starts a real mlflow server (~10 s each)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for server in _STARTED:
        server.stop()


def free_port() -> int:
    """A port nothing listens on now (bound to 0, released; a small race we accept in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """``mlflow server`` with proxied artifacts under ``root``; restartable on one port.

    The backend store is ``backend_store_uri`` (e.g. ``postgresql+psycopg://...``), else a SQLite file in ``root``.

    Flags that matter with mlflow 3: ``--host 127.0.0.1`` (loopback only), ``--workers 1`` (default 4
    workers cost seconds and memory on 2 cores) and MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false (otherwise
    it also spawns a huey job runner with ~7 consumer processes, doubling start-up). The default security
    middleware accepts Host 127.0.0.1, so no --allowed-hosts or --disable-security-middleware is needed.
    """

    def __init__(self, root: Path, port: int | None = None, backend_store_uri: str | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = root / "server.db"
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.db}"
        self.artifacts = root / "artifacts"
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_file = root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", self.backend_store_uri,
               "--serve-artifacts", "--artifacts-destination", str(self.artifacts)]
        with self.log_file.open("ab") as out:
            # own session = own process group: killpg reaches the uvicorn worker too
            self._proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        _STARTED.append(self)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} not healthy within {timeout_s} s:\n{self._log_tail()}")

    def stop(self) -> None:
        """Kill the whole process group at once (SIGKILL: an abrupt crash, like a lost server)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # the group may outlive its leader for a moment; wait until the port is free again
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _listening(self.port):
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self, lines: int = 30) -> str:
        text = self.log_file.read_text(errors="replace", encoding="utf-8") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The http URI of a real mlflow server shared by the session (use unique experiment/run names)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def mlflow_server_factory(tmp_path: Path) -> Iterator[Callable[[], MlflowServer]]:
    """Make (not start) private servers for tests that stop and restart them; all are killed at teardown."""
    made: list[MlflowServer] = []

    def make() -> MlflowServer:
        server = MlflowServer(tmp_path / f"mlflow-server-{len(made)}")
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()

"""A team's tracking server for real: ``mlflow server`` on a PostgreSQL backend store with served artifacts.

One PostgreSQL cluster (initdb in tmp, 127.0.0.1 on a free port, its unix socket in tmp) and one mlflow
server on it serve the whole module; every client talks to it only through ``--tracking-uri http://...``:

- two processes log many metric points concurrently, to runs of one experiment they both create: no point
  is lost or doubled;
- ``medsup train`` (a process of its own) loses its server mid-training, which is restarted on the same port
  (PostgreSQL keeps the data): every metric point of every epoch arrives exactly once and the model is
  registered as ``medsup-tiny@candidate``; ``medsup models promote`` (another process) moves ``champion``
  onto it, and ``medsup infer --model models:/medsup-tiny@champion`` (a third) segments the tiny images.

How long an outage a training tolerates (:mod:`medsup.tracking.runs`, ``outbox``, ``spool``): any, as long
as it ends within 5 minutes of the training's end. Training never waits for the server: a failed send keeps
the records in memory (up to 100,000; beyond that only in the spool file in the run folder) and retries
after 1, 2, 4 ... s, capped at 60 s, however long the outage lasts (a server that is back is noticed at
the next try, at most 60 s later). At the end, ``RunTracker.finish`` keeps retrying (every <= 5 s) for up
to 300 s (``outage_tolerance_s``); if the server is still down then, the records stay in the spool and
``python -m medsup.tracking replay SPOOL`` sends them later without duplicates. Two things do need the
server: starting a training (``check_reachable`` fails it at once) and, once training ends, logging and
registering the model, which is not queued but retried with backoff for the same 300 s
(``registry.with_patience``); a server down for longer costs the registration, logged as an error (the
bundle stays in ``<run>/model``).

Running PostgreSQL: the binaries come from ``$PATH`` or Debian's ``/usr/lib/postgresql/<major>/bin``
(.ci/run installs Debian's ``postgresql`` package when ``initdb`` is missing). PostgreSQL refuses to run
as root, so as root (CI, these machines) the cluster belongs to the ``postgres`` user when it exists, else
``nobody``, and its processes are started with that uid; the data folder is a ``mkdtemp`` under the
system temp folder (pytest's own tmp folders are 0700 root). Without binaries or ``psycopg`` (the
``server`` extra) the module is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from medsup.checkpoint import load_checkpoint
from tests.conftest import write_msd
from tests.integration.conftest import MlflowServer, free_port

REPO = Path(__file__).resolve().parents[2]
# The driver named explicitly: SQLAlchemy 2.0 reads a bare postgresql:// as psycopg2, 2.1 as psycopg (3);
# the server extra installs psycopg 3.
BACKEND_SCHEME = "postgresql+psycopg"

pytestmark = pytest.mark.mlflow_server


# ---------------------------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path | None:
    """The folder holding ``initdb``/``pg_ctl``: from ``$PATH``, else the newest Debian major version."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # /usr/local/bin/initdb may link into /usr/lib/postgresql/N/bin
    debian = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not debian:
        return None

    def major(path: str) -> int:
        match = re.search(r"/postgresql/(\d+)/", path)
        return int(match.group(1)) if match else 0

    return Path(max(debian, key=major)).parent


def _server_user() -> pwd.struct_passwd | None:
    """Who owns and runs the cluster: ourselves, or as root (which postgres refuses) postgres or nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


class Postgres:
    """A throw-away PostgreSQL cluster: trust auth for user ``medsup`` on 127.0.0.1, fsync off (tests only)."""

    user = "medsup"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.owner = _server_user()
        # mkdtemp under the system temp folder: short (the socket path limit is 107 bytes) and reachable by
        # an unprivileged owner, unlike pytest's 0700 tmp folders
        self.root = Path(tempfile.mkdtemp(prefix="medsup-pg-"))
        if self.owner is not None:
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        self.data = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self.port = free_port()
        self.started = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kw: dict[str, Any] = {}
        if self.owner is not None:
            kw.update(user=self.owner.pw_uid, group=self.owner.pw_gid, extra_groups=[])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
               "HOME": str(self.root)}
        proc = subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.root, env=env, timeout=timeout,
                              capture_output=True, encoding="utf-8", errors="replace", check=False, **kw)
        if proc.returncode != 0:
            log = self.log_file.read_text(errors="replace", encoding="utf-8")[-3000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}\n{log}")
        return proc

    def start(self) -> Postgres:
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_file), "-o", options, "-w", "-t", "60", "start")
        self.started = True
        return self

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; returns its SQLAlchemy URI for the psycopg (3) driver."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{BACKEND_SCHEME}://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.started:
            self.started = False
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on $PATH nor in /usr/lib/postgresql/*/bin): "
                    "`apt-get install postgresql` (.ci/run does it when apt works) to run the server tests")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is missing: `pip install -e .[server]` (the Makefile installs it) for the server tests")
    pg = Postgres(bindir)
    try:
        yield pg.start()
    finally:
        pg.stop()


@dataclass(frozen=True)
class PgServer:
    """The module's mlflow server on PostgreSQL; ``server`` may be stopped and started on the same port."""

    server: MlflowServer
    backend: str

    @property
    def uri(self) -> str:
        return self.server.uri


@pytest.fixture(scope="module")
def pg_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    backend = postgres.create_database("mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("pg-mlflow"), backend_store_uri=backend)
    try:
        server.start(timeout_s=180)  # the first start creates MLflow's schema
        yield PgServer(server, backend)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_msd(tmp_path_factory.mktemp("pg-data") / "tiny", n=4)


def _client_env() -> dict[str, str]:
    """The environment of a client process: no MLFLOW_TRACKING_* variable, the server comes from its arguments."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}


def _medsup(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m medsup ARGS`` in a fresh process that knows the server only from its arguments."""
    proc = subprocess.run([sys.executable, "-m", "medsup", *args], cwd=REPO, env=_client_env(), capture_output=True,
                          encoding="utf-8", errors="replace", timeout=timeout, check=False)
    assert proc.returncode == 0, f"medsup {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------------------------------------- tests


def test_server_stores_runs_in_postgres(pg_server: PgServer) -> None:
    """The server really writes to PostgreSQL (not a fallback store): MLflow's tables are there."""
    import psycopg

    experiment_id = MlflowClient(pg_server.uri).create_experiment("pg-probe")
    with psycopg.connect(pg_server.backend.replace(f"{BACKEND_SCHEME}://", "postgresql://")) as conn:
        row = conn.execute("SELECT name FROM experiments WHERE experiment_id = %s", (int(experiment_id),)).fetchone()
    assert row == ("pg-probe",)


_LOGGER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from medsup.tracking import RunTracker

    uri, experiment, name, spool, steps = sys.argv[1:6]
    # small batches, sent often: the two processes' requests interleave on the server
    with RunTracker(uri, experiment, name, spool_dir=Path(spool), flush_interval_s=0.05, flush_points=40) as t:
        t.log_params({"writer": name})
        for step in range(int(steps)):
            t.log_metrics({"loss": 1.0 / (step + 1), "dice": step / 1000, "lr": 0.01, "gpu": 0.0}, step=step)
        run_id = t.run_id
    print("run_id", run_id)  # MLflow prints its own "View run" lines on stdout too
""")


def test_concurrent_writers_lose_no_points(pg_server: PgServer, tmp_path: Path) -> None:
    """Two processes create the same experiment and log 4 x 600 points each at once: every point arrives once."""
    steps, experiment = 600, f"pg-concurrent-{os.getpid()}"
    procs = [subprocess.Popen([sys.executable, "-c", _LOGGER, pg_server.uri, experiment, f"writer{i}",
                               str(tmp_path / f"spool{i}"), str(steps)], cwd=REPO, env=_client_env(),
                              encoding="utf-8", errors="replace", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    run_ids = [line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("run_id ")]
    assert len(set(run_ids)) == 2, outputs

    client = MlflowClient(pg_server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    assert {r.info.run_id for r in client.search_runs([exp.experiment_id])} == set(run_ids)
    for run_id in run_ids:
        assert client.get_run(run_id).info.status == "FINISHED"
        for key in ("loss", "dice", "lr", "gpu"):
            assert _steps(client, run_id, key) == list(range(steps)), key
        history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
        assert all(history[s] == 1.0 / (s + 1) for s in range(steps))
    for i in range(2):
        assert not list((tmp_path / f"spool{i}").glob("*.jsonl")), "a spool file was left: not everything was sent"


@pytest.mark.slow
def test_train_through_outage_then_promote_and_infer(pg_server: PgServer, tiny_data: Path, tmp_path: Path) -> None:
    """The team workflow, every client knowing only ``--tracking-uri http://...``, with a server crash in it.

    1. ``medsup train`` runs in its own process; after epoch 1 the mlflow server is SIGKILLed, an epoch passes
       without it, and it is restarted on the same port (PostgreSQL keeps the data) while the training is
       paused (SIGSTOP/SIGCONT). Every per-epoch metric must then hold exactly one point per epoch, and the
       model is registered as medsup-tiny @candidate.
    2. ``medsup models promote`` (another process) moves @champion onto that version.
    3. ``medsup infer --model models:/medsup-tiny@champion`` (a third process) segments the tiny images.
    """
    epochs, uri, client = 6, pg_server.uri, MlflowClient(pg_server.uri)
    out, log_file = tmp_path / "run", tmp_path / "train.log"
    stderr = log_file.open("w")  # a file, not a pipe: nobody reads a pipe while the test polls
    proc = subprocess.Popen(
        [sys.executable, "-m", "medsup", "train", "--task", "tiny", "--data", str(tiny_data), "--preset", "smoke",
         "--set", f"train.epochs={epochs}", "--set", "train.iterations_per_epoch=2", "--set", "train.val_max_cases=1",
         # send often, so that the trainer meets the dead server within the epoch it is dead, however fast that is
         "--set", "tracking.flush_interval_s=0.2", "--set", "train.figures=false",
         "--output", str(out), "--tracking-uri", uri, "--experiment", "pg-outage", "--json"],
        cwd=REPO, env={**_client_env(), "PYTHONUNBUFFERED": "1"}, encoding="utf-8", errors="replace",
        stdout=subprocess.PIPE, stderr=stderr)
    last = out / "checkpoints" / "last.pt"

    def epoch_done() -> int:
        with contextlib.suppress(Exception):  # absent, or being replaced
            return int(load_checkpoint(last)["epoch"]) if last.is_file() else 0
        return 0

    def wait_for(what: str, cond: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            log_text = log_file.read_text(encoding="utf-8", errors="replace")
            assert proc.poll() is None, f"training ended while waiting for {what}:\n{log_text}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    try:
        wait_for("epoch 1", lambda: epoch_done() >= 1)
        killed_at = epoch_done()
        pg_server.server.stop()  # SIGKILL to the server's process group, mid-training
        wait_for("an epoch during the outage", lambda: epoch_done() >= killed_at + 1)
        wait_for("the trainer to notice the outage",
                 lambda: "unreachable" in log_file.read_text(encoding="utf-8", errors="replace"))
        # freeze the training while the server restarts (tens of seconds on a busy machine), so that the
        # outage ends before the training does, however slow either is: registering the model at the end
        # waits for the server only up to 300 s
        proc.send_signal(signal.SIGSTOP)
        try:
            assert epoch_done() < epochs, "training too fast: the outage did not fall mid-training"
            pg_server.server.start(timeout_s=120)  # same port, same PostgreSQL database
        finally:
            proc.send_signal(signal.SIGCONT)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        stderr.close()
        if not pg_server.server.running:  # leave the module's server up for the other tests
            pg_server.server.start(timeout_s=120)
    log_text = log_file.read_text(errors="replace", encoding="utf-8")
    assert proc.returncode == 0, log_text
    assert "unreachable" in log_text and "answers again" in log_text, "the outage was not noticed:\n" + log_text
    summary = json.loads(output[output.index("{"):])  # MLflow's "View run" lines may come first
    run_id = summary["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    per_epoch = [k for k in run.data.metrics if k.startswith(("train.", "val.")) or k == "epoch"]
    assert {"train.loss.total", "val.dice", "epoch"} <= set(per_epoch)
    for key in per_epoch:
        assert _steps(client, run_id, key) == list(range(1, epochs + 1)), key
    epoch_values = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "epoch"))
    assert epoch_values == [(e, float(e)) for e in range(1, epochs + 1)]
    assert not list(out.glob("*.jsonl")), "a spool file was left: not everything was sent"
    version = client.get_model_version_by_alias("medsup-tiny", "candidate")
    assert version.run_id == run_id, log_text

    promoted = _medsup("models", "promote", "--task", "tiny", "--from-alias", "candidate", "--tracking-uri", uri)
    assert f"medsup-tiny@champion -> version {version.version}" in promoted.stdout
    assert client.get_model_version_by_alias("medsup-tiny", "champion").version == version.version

    pred = tmp_path / "pred"
    _medsup("infer", "-i", str(tiny_data / "imagesTr"), "-o", str(pred), "--model", "models:/medsup-tiny@champion",
            "--tracking-uri", uri, "--device", "cpu")
    report = json.loads((pred / "report.json").read_text(encoding="utf-8"))
    assert len(report["cases"]) == 4
    for case in report["cases"]:
        assert case["status"] == "ok", case
        assert Path(case["output"]).is_file()

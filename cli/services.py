"""The local servers: Prefect (API, UI and a process worker), MLflow (tracking server and UI) and
the captioner's web page (`ituning app`, on the registry's champion).

`make serve` starts them on 127.0.0.1, each in its own session with a pid file and a log under
workspace/services/, registers the deployments of prefect.yaml and writes workspace/services/env.sh
(the variables a shell needs to talk to them). `make stop` stops them: the worker first, since a
worker whose server is gone ignores SIGTERM.

Who may ask: the Prefect server runs Prefect's app behind flows/server.py, which answers
loopback host names only and, from a browser, the UI's own origins only; Prefect's CORS list names those
origins and its CSRF protection is on. MLflow's server checks Host and origin itself.

Databases: SQLite in the workspace by default. Set PREFECT_API_DATABASE_CONNECTION_URL
(postgresql+asyncpg://...) for Prefect, ITUNING_MLFLOW_BACKEND_URI (postgresql+psycopg2://...) and
ITUNING_MLFLOW_ARTIFACTS (s3://bucket/prefix, with MLFLOW_S3_ENDPOINT_URL for S3-compatible stores)
for MLflow; see docs/deployment.md.
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.page_guard import ui_origins

PROJECT_ROOT = Path(__file__).resolve().parent.parent
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
STOP_ORDER = ("app", "worker", "prefect-server", "mlflow")


@dataclass(frozen=True)
class ServiceSettings:
    workspace: Path
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    app_port: int = 7860
    work_pool: str = "ituning-local"

    @property
    def directory(self) -> Path:
        return self.workspace / "services"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def app_url(self) -> str:
        return f"http://{self.host}:{self.app_port}"

    def environment(self) -> dict[str, str]:
        """What a client (shell, worker, flow run) needs to reach these servers."""
        return {
            **QUIET,
            "PREFECT_HOME": str(self.workspace.resolve() / "prefect"),
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "ITUNING_WORKSPACE": str(self.workspace.resolve()),
        }

    def prefect_server_environment(self) -> dict[str, str]:
        """The Prefect server's own settings: browsers may call it from its UI's origins only, with a CSRF token."""
        return {"PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(ui_origins(self.host, self.prefect_port)),
                "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true"}


def start_all(settings: ServiceSettings) -> None:
    settings.directory.mkdir(parents=True, exist_ok=True)
    _start(settings, "mlflow", _mlflow_command(settings))  # starts meanwhile; checked last
    start_prefect(settings)
    _start(settings, "worker", [_bin("prefect"), "worker", "start", "--pool", settings.work_pool])
    _wait_healthy(f"{settings.mlflow_url}/health", "MLflow server", settings)
    _start(settings, "app", [_bin("ituning"), "app", "--host", settings.host, "--port", str(settings.app_port),
                             "--workspace", str(settings.workspace.resolve())])
    _wait_healthy(f"{settings.app_url}/health", "captioner page", settings)
    _write_env_file(settings)


def start_prefect(settings: ServiceSettings, deployments: tuple[str, ...] = ()) -> None:
    """The Prefect server, the work pool and the deployments of prefect.yaml (the named ones, or all);
    returns once they are registered. The server's scheduler then creates the scheduled runs."""
    settings.directory.mkdir(parents=True, exist_ok=True)
    _start(settings, "prefect-server", [sys.executable, "-m", "flows.server", "--host", settings.host,
                                        "--port", str(settings.prefect_port)], settings.prefect_server_environment())
    _wait_healthy(f"{settings.prefect_api_url}/health", "Prefect server", settings)
    _run(settings, [_bin("prefect"), "work-pool", "create", settings.work_pool, "--type", "process", "--overwrite"])
    names = [option for name in deployments for option in ("--name", name)] or ["--all"]
    _run(settings, [_bin("prefect"), "--no-prompt", "deploy", *names])


def start_mlflow(settings: ServiceSettings) -> None:
    """The MLflow tracking server alone, started as start_all starts it; returns once it is healthy."""
    settings.directory.mkdir(parents=True, exist_ok=True)
    _start(settings, "mlflow", _mlflow_command(settings))
    _wait_healthy(f"{settings.mlflow_url}/health", "MLflow server", settings)


def stop_all(settings: ServiceSettings, timeout_s: float = 30) -> list[str]:
    """Stop every service that has a pid file; returns the names stopped."""
    stopped = []
    for name in STOP_ORDER:
        pid_file = settings.directory / f"{name}.pid"
        if not pid_file.exists():
            continue
        _stop_process_group(int(pid_file.read_text()), timeout_s)
        pid_file.unlink()
        stopped.append(name)
    return stopped


def _mlflow_command(settings: ServiceSettings) -> list[str]:
    workspace = settings.workspace.resolve()
    backend = os.environ.get("ITUNING_MLFLOW_BACKEND_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    artifacts = os.environ.get("ITUNING_MLFLOW_ARTIFACTS", (workspace / "mlartifacts").as_uri())
    return [_bin("mlflow"), "server", "--host", settings.host, "--port", str(settings.mlflow_port),
            "--backend-store-uri", backend, "--artifacts-destination", artifacts, "--workers", "1"]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _child_environment(settings: ServiceSettings) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` and the worker exec by name
    # MLflow's server otherwise starts a pool of GenAI job processes (about 2 GB) the pipeline never uses.
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return {**quiet, **os.environ, **settings.environment(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _start(settings: ServiceSettings, name: str, command: list[str], environment: dict[str, str] | None = None) -> None:
    pid_file = settings.directory / f"{name}.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"{name} already running (pid {pid_file.read_text()})")
        return
    log = open(settings.directory / f"{name}.log", "ab")
    env = {**_child_environment(settings), **(environment or {})}
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(str(process.pid))
    print(f"started {name} (pid {process.pid}, log {settings.directory / f'{name}.log'})")


def _run(settings: ServiceSettings, command: list[str]) -> None:
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=_child_environment(settings), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def _wait_healthy(url: str, what: str, settings: ServiceSettings, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{what} not healthy at {url} after {timeout_s:.0f} s; see logs in {settings.directory}")


def _write_env_file(settings: ServiceSettings) -> None:
    bin_dir = Path(sys.executable).parent
    lines = [f"export {key}={value}" for key, value in settings.environment().items()]
    lines.append(f'export PATH="{bin_dir}:$PATH"')
    (settings.directory / "env.sh").write_text("\n".join(lines) + "\n")


def _alive(pid: int) -> bool:
    try:  # a child of this process stays a zombie, which signal 0 still reaches, until it is reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child (`make stop` after `make serve`)
        pass
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop_process_group(pid: int, timeout_s: float) -> None:
    """SIGINT to the service's own process, then SIGTERM and SIGKILL to its whole process group while it lives.

    The first signal goes to the leader alone: `mlflow server` forwards SIGINT to its uvicorn, which takes
    a second SIGINT (the group's) as "quit now" and skips its application's shutdown. What the leader
    leaves behind (a worker's flow-run processes) is terminated once it is gone."""
    for send, sig in ((os.kill, signal.SIGINT), (os.killpg, signal.SIGTERM), (os.killpg, signal.SIGKILL)):
        try:
            send(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s / 3
        while time.monotonic() < deadline:
            if not _alive(pid):
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                return
            time.sleep(0.2)

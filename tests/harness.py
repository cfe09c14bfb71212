"""The real services the tests talk to, each started one way, waited for one way and checked one way.

Every server is real and listens on 127.0.0.1 at a free port: the Prefect server and the MLflow
tracking server as `ituning serve` starts them (cli/services.py), PostgreSQL, moto's S3 server,
the captioner's web page (`ituning app`) and `mlflow models serve`. Each is started by `running()`,
which waits for its health URL (`wait_healthy`, the one health loop), stops it at the end and then
fails the test on server-side errors in its log (tests/service_logs.py).

The session fixtures start the servers most tests share once per test session: `prefect_service`,
`mlflow_service`, `postgres`, `s3_service`. A test that needs a server of its own (another database,
a server it stops on purpose) starts it with the same functions and says why.

The loopback hub (tests/hub_server.py) and the corpus server (tests/corpus_server.py) are threads of
the test process: they start in milliseconds and hold what one test planted (faults, pushed
repositories), so each test starts its own.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.ports import free_port
from tests.service_logs import assert_clean_log

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A busy machine starts a Prefect server in minutes, not seconds: the wait is generous, never a test of speed.
STARTUP_S = 600
# Before any server of the session started: a lower bound for what a server did on its own (scheduled runs).
SESSION_STARTED = datetime.now(timezone.utc)


def wait_healthy(url: str, process: subprocess.Popen | None = None, log: Path | None = None,
                 within_s: float = STARTUP_S) -> None:
    """Return once `url` answers 2xx; fail at once, quoting the log, if `process` exits first."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args[:3]} exited with {process.returncode} before {url} answered:\n"
                                 f"{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if 200 <= response.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"nothing healthy at {url} after {within_s:.0f} s:\n{_tail(log)}")


def origin(url: str) -> str:
    """http://127.0.0.1:PORT of a URL on that server."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _tail(log: Path | None, characters: int = 3000) -> str:
    return Path(log).read_text(errors="replace")[-characters:] if log and Path(log).exists() else ""


@dataclass(frozen=True)
class Service:
    url: str
    process: subprocess.Popen
    log: Path


@contextmanager
def running(command: list[str], health_url: str, log: Path, env: dict | None = None, cwd: Path = ROOT,
            allowed: tuple[tuple[str, str], ...] = ()):
    """A server process from start to health to stop; its log is checked once it has stopped."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(health_url, process, log)
        yield Service(origin(health_url), process, log)
    finally:
        stop_process_group(process)
    assert_clean_log(log, allowed)


def stop_process_group(process: subprocess.Popen, within_s: float = 60) -> None:
    """SIGINT to the server (its clean shutdown), then SIGTERM and SIGKILL to its whole session; what the
    leader leaves behind is terminated once it is gone."""
    for stop in (lambda: process.send_signal(signal.SIGINT), lambda: _signal_group(process, signal.SIGTERM),
                 lambda: _signal_group(process, signal.SIGKILL)):
        stop()
        try:
            process.wait(timeout=within_s / 3)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(process, signal.SIGTERM)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def environment_without(*prefixes: str, **extra: str) -> dict[str, str]:
    """This process's environment less the variables that start with `prefixes`, plus `extra`."""
    return {**{key: value for key, value in os.environ.items() if not key.startswith(prefixes)}, **extra}


# ---- Prefect and MLflow, as `ituning serve` starts them -------------------------------------------------

@contextmanager
def services_started(settings, start, environment: dict[str, str]):
    """cli/services.py's own start function under `environment`; stopped and logs checked at the end."""
    from cli.services import stop_all

    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith(("PREFECT_", "MLFLOW_"))]:
            patch.delenv(name)  # the server and its deploy see only these settings
        for name, value in environment.items():
            patch.setenv(name, value)
        try:
            start(settings)
        except BaseException:
            stop_all(settings)
            raise
    try:
        yield settings
    finally:
        stop_all(settings)
    for log in sorted(settings.directory.glob("*.log")):
        assert_clean_log(log)


@pytest.fixture(scope="session")
def prefect_service(tmp_path_factory):
    """The Prefect server of `ituning serve` (host and origin guard, CSRF on) with the weekly retraining
    deployed, shared by the whole session. Its scheduler looks every 5 s instead of every 60 s."""
    from cli.services import ServiceSettings, start_prefect

    settings = ServiceSettings(tmp_path_factory.mktemp("prefect-service") / "ws", prefect_port=free_port())
    scheduler = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
    with services_started(settings, lambda s: start_prefect(s, deployments=("retrain-weekly",)), scheduler):
        yield settings


@pytest.fixture(scope="session")
def prefect_api(prefect_service, tmp_path_factory):
    """Flows run in this process report to the shared Prefect server (from here to the session's end),
    their results persisted in a folder of the session's."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    results = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_API_URL: prefect_service.prefect_api_url, PREFECT_LOCAL_STORAGE_PATH: results}):
        yield prefect_service


@contextmanager
def mlflow_started(workspace: Path, environment: dict[str, str] | None = None):
    """An MLflow tracking server as `ituning serve` starts it, on the workspace's SQLite store unless
    `environment` names another (ITUNING_MLFLOW_BACKEND_URI, ITUNING_MLFLOW_ARTIFACTS)."""
    from cli.services import ServiceSettings, start_mlflow

    settings = ServiceSettings(workspace, mlflow_port=free_port())
    with services_started(settings, start_mlflow, environment or {}):
        yield settings


@pytest.fixture(scope="session")
def mlflow_service(tmp_path_factory):
    with mlflow_started(tmp_path_factory.mktemp("mlflow-service") / "ws") as settings:
        yield settings


# ---- PostgreSQL and S3 ------------------------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "ituning"
needs_postgres = pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason="PostgreSQL 15 server binaries not installed")


def as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int

    def create_database(self, prefix: str) -> str:
        """A new database named after `prefix`, unique in the session; returns its name."""
        name = f"{prefix}_{time.monotonic_ns()}"
        subprocess.run(as_postgres([str(PG_BIN / "createdb"), "-h", self.host, "-p", str(self.port), "-U", PG_USER,
                                    name]), check=True, capture_output=True)
        return name

    def url(self, driver: str, database: str) -> str:
        """A SQLAlchemy URL, e.g. url("psycopg2", "mlflow") -> postgresql+psycopg2://ituning@127.0.0.1:P/mlflow."""
        return f"postgresql+{driver}://{PG_USER}@{self.host}:{self.port}/{database}"

    def query(self, database: str, sql: str, parameters: tuple = ()) -> list[tuple]:
        import psycopg2

        with closing(psycopg2.connect(host=self.host, port=self.port, user=PG_USER, dbname=database)) as connection:
            with connection.cursor() as cursor:
                cursor.execute(sql, parameters)
                return cursor.fetchall()


# PostgreSQL logs each statement it refuses. Prefect's server now and then inserts a task run from the task's
# event and from the task's own API call at the same moment; the loser's insert is refused and Prefect's
# task-run recorder takes the event again (PrefectHQ/prefect#21807, #21809). Any other refusal fails the test.
PREFECT_TASK_RUN_RACE = ((r'ERROR:  duplicate key value violates unique constraint "pk_task_run"',
                          "Prefect's task-run recorder racing the API on one task run, and retrying"),)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """One PostgreSQL 15 server for the session; each test creates databases of its own."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 server binaries not installed")
    # Outside pytest's temporary folders: their parents are private to the current user, not to postgres.
    data, port = Path(tempfile.mkdtemp(prefix="ituning-pg-")), free_port()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run(as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust"]),
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-w", "start",
                                "-l", str(data / "log")]), check=True, capture_output=True)
    log = tmp_path_factory.mktemp("postgres") / "postgres.log"
    try:
        yield PostgresServer("127.0.0.1", port)
    finally:
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        if (data / "log").exists():  # kept beside the session's files: the data folder goes
            shutil.copy(data / "log", log)
        shutil.rmtree(data, ignore_errors=True)
    assert_clean_log(log, PREFECT_TASK_RUN_RACE)


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    """moto's standalone S3 server; its endpoint URL. Each test creates buckets of its own."""
    port, log = free_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    with running([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"{endpoint}/moto-api/", log):
        yield endpoint


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])


# ---- the captioner's web page -------------------------------------------------------------------------------

@contextmanager
def app_running(arguments: list[str], log: Path, cwd: Path = ROOT):
    """`ituning app ARGUMENTS` on a free port of 127.0.0.1, run from `cwd`, tracking only where its
    arguments say (no MLFLOW_* from the test process); yields the page's URL."""
    port = free_port()
    command = [str(BIN / "ituning"), "app", *arguments, "--port", str(port)]
    with running(command, f"http://127.0.0.1:{port}/health", log, environment_without("MLFLOW_"), cwd) as app:
        yield app.url

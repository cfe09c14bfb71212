"""The Prefect server on PostgreSQL by configuration (PREFECT_API_DATABASE_CONNECTION_URL): a flow
run through it lands in PostgreSQL's tables. Needs the PostgreSQL 15 server binaries."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_services import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason="PostgreSQL 15 server binaries not installed")]


def as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres():
    # Outside pytest's tmp_path: its parents are private to the current user, not to postgres.
    data, port = Path(tempfile.mkdtemp(prefix="ituning-pg-")), free_port()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run(as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "ituning", "--auth=trust"]),
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-w", "start",
                                "-l", str(data / "log")]), check=True, capture_output=True)
    try:
        subprocess.run(as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "ituning",
                                    "prefect"]), check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_prefect_server_on_postgresql_records_a_flow_run(postgres, tmp_path):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://ituning@{postgres}/prefect")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health")
        client_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        script = ("from flows.download_datasets import download_datasets; "
                  f"download_datasets(datasets=['coco'], workspace={str(tmp_path / 'ws')!r}, synthetic_images=15)")
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=client_env, check=True, capture_output=True,
                       timeout=300)
        host, pg_port = postgres.split(":")
        rows = subprocess.run([str(PG_BIN.parent / "bin" / "psql"), "-h", host, "-p", pg_port, "-U", "ituning", "-d",
                               "prefect", "-Atc", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id"],
                              capture_output=True, text=True, check=True).stdout.split()
        assert "download-datasets|COMPLETED" in rows
    finally:
        server.send_signal(2)
        server.wait(timeout=60)

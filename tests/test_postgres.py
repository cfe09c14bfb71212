"""The Prefect server on PostgreSQL by configuration (PREFECT_API_DATABASE_CONNECTION_URL): a flow
run through it lands in PostgreSQL's tables. Needs the PostgreSQL 15 server binaries."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.postgres_fixtures import needs_postgres, postgres  # noqa: F401  (postgres is a fixture)
from tests.service_logs import assert_clean_log
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, needs_postgres]


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def test_prefect_server_on_postgresql_records_a_flow_run(postgres, tmp_path):  # noqa: F811
    postgres.create_database("prefect")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_API_DATABASE_CONNECTION_URL=postgres.url("asyncpg", "prefect"))
    log = (tmp_path / "prefect-server.log").open("wb")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/api/health")
        client_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        script = ("from flows.download_datasets import download_datasets; "
                  f"download_datasets(datasets=['coco'], workspace={str(tmp_path / 'ws')!r}, synthetic_images=15)")
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=client_env, check=True, capture_output=True,
                       timeout=300)
        rows = postgres.query("prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        assert ("download-datasets", "COMPLETED") in rows
    finally:
        server.send_signal(2)
        server.wait(timeout=60)
        log.close()
    assert_clean_log(tmp_path / "prefect-server.log")

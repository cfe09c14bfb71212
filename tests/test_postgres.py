"""The Prefect server on PostgreSQL by configuration (PREFECT_API_DATABASE_CONNECTION_URL): a flow
run through it lands in PostgreSQL's tables. Needs the PostgreSQL 15 server binaries."""

import subprocess
import sys

import pytest

from tests.harness import ROOT, BIN, environment_without, needs_postgres, running
from tests.ports import free_port

pytestmark = [pytest.mark.slow, needs_postgres]


def test_prefect_server_on_postgresql_records_a_flow_run(postgres, tmp_path):
    """A Prefect server of its own: the session's keeps its database in SQLite."""
    database, port = postgres.create_database("prefect"), free_port()
    env = environment_without("PREFECT_", PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                              DO_NOT_TRACK="1", PREFECT_API_DATABASE_CONNECTION_URL=postgres.url("asyncpg", database))
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with running(command, f"http://127.0.0.1:{port}/api/health", tmp_path / "prefect-server.log", env):
        client_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        script = ("from flows.download_datasets import download_datasets; "
                  f"download_datasets(datasets=['coco'], workspace={str(tmp_path / 'ws')!r}, synthetic_images=15)")
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=client_env, check=True, capture_output=True,
                       timeout=300)
        rows = postgres.query(database, "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        assert ("download-datasets", "COMPLETED") in rows

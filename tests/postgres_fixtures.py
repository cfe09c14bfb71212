"""A throwaway PostgreSQL 15 server on 127.0.0.1 for the deployment tests. Needs the server binaries
(Debian package postgresql); tests marked `needs_postgres` are skipped without them."""

import os
import shutil
import subprocess
import tempfile
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service_logs import assert_clean_log
from tests.ports import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "ituning"
needs_postgres = pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason="PostgreSQL 15 server binaries not installed")


def as_postgres(command: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int

    def create_database(self, name: str) -> None:
        subprocess.run(as_postgres([str(PG_BIN / "createdb"), "-h", self.host, "-p", str(self.port), "-U", USER, name]),
                       check=True, capture_output=True)

    def url(self, driver: str, database: str) -> str:
        """A SQLAlchemy URL, e.g. url("psycopg2", "mlflow") -> postgresql+psycopg2://ituning@127.0.0.1:P/mlflow."""
        return f"postgresql+{driver}://{USER}@{self.host}:{self.port}/{database}"

    def query(self, database: str, sql: str, parameters: tuple = ()) -> list[tuple]:
        import psycopg2

        with closing(psycopg2.connect(host=self.host, port=self.port, user=USER, dbname=database)) as connection:
            with connection.cursor() as cursor:
                cursor.execute(sql, parameters)
                return cursor.fetchall()


@pytest.fixture
def postgres(tmp_path):
    # Outside pytest's tmp_path: its parents are private to the current user, not to postgres.
    data, port = Path(tempfile.mkdtemp(prefix="ituning-pg-")), free_port()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
    subprocess.run(as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", USER, "--auth=trust"]),
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-w", "start",
                                "-l", str(data / "log")]), check=True, capture_output=True)
    try:
        yield PostgresServer("127.0.0.1", port)
    finally:
        subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        if (data / "log").exists():  # kept beside the test's files: the data folder goes
            shutil.copy(data / "log", tmp_path / "postgres.log")
        shutil.rmtree(data, ignore_errors=True)
    assert_clean_log(tmp_path / "postgres.log")

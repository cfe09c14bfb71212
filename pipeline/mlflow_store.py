"""The workspace's own MLflow store (SQLite at workspace/mlflow.db, artifacts in workspace/mlartifacts)
after the workspace was copied or moved.

MLflow keeps artifact locations as absolute file:// URIs: the experiment's, each run's, each logged
model's and each registered model version's. In a copy they still name the original folder, so new
runs would write their artifacts there and registry lookups would read from there (or find nothing,
the original being gone). The first time the store is opened at a new place, every location under
the old workspace is rewritten to the same place under this one. MLflow has no API to change them,
so this is one SQL update per column; any other store (a server, PostgreSQL) is left alone.
"""

import sqlite3
from pathlib import Path

ARTIFACTS = "mlartifacts"
# (table, column) of MLflow 3's SQL store that hold artifact locations.
LOCATIONS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
             ("model_versions", "source"), ("model_versions", "storage_location"))


def follow_moved_workspace(database: Path) -> str | None:
    """Point the artifact locations of the SQLite store at `database` (workspace/mlflow.db) from the
    workspace it was made in to the one it lies in now; returns the old workspace's URI when it moved."""
    if not database.is_file():
        return None
    here = database.resolve().parent.as_uri()
    with sqlite3.connect(database, timeout=30) as connection:
        old = _recorded_workspace(connection)
        if old is None or old == here:
            return None
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in LOCATIONS:
            if table in tables:
                connection.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                   f"WHERE substr({column}, 1, ?) = ?", (here, len(old) + 1, len(old), old))
    return old


def _recorded_workspace(connection: sqlite3.Connection) -> str | None:
    """The workspace URI the store's experiments put their artifacts under (<workspace>/mlartifacts)."""
    try:
        locations = [row[0] for row in connection.execute("SELECT artifact_location FROM experiments")]
    except sqlite3.Error:  # not (yet) an MLflow store
        return None
    suffix = f"/{ARTIFACTS}"
    found = [location[:-len(suffix)] for location in locations
             if location and location.startswith("file://") and location.endswith(suffix)]
    return found[0] if found else None

"""Opening the DuckDB catalog while other processes use it.

DuckDB lets one process open a database file for writing, or any number open it read-only, never
both at once; a refused open raises an IOException that names only the holder's PID. Here:

- A catalog build holds catalog.duckdb.lock (storage/locks.py) for as long as it runs, which names
  the building process and when it started; a second build waits for it a little, then stops with
  BuildRunning.
- connect() opens the catalog, retrying for a few seconds while another process holds the file
  (a reader's query, a writer's short update), and otherwise raises CatalogBusy: one line naming
  the build that holds the catalog, or DuckDB's PID when no build does.
"""

import re
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb

from storage.locks import FileLock, LockHeld, alive_elsewhere, read_holder

BUSY_WAIT_S = 5.0


class CatalogBusy(OSError, duckdb.IOException):
    """Another process holds the catalog file, so DuckDB refused to open it."""


class BuildRunning(LockHeld):
    """Another process is building the catalog."""


def build_lock(path: Path) -> FileLock:
    return FileLock(Path(path).with_name(Path(path).name + ".lock"))


@contextmanager
def build_lock_held(path: Path, wait: float = BUSY_WAIT_S):
    """Hold the catalog's build lock, waiting up to `wait` seconds for another build to finish."""
    with build_lock(path) as lock:
        if not lock.acquire(wait):
            holder = lock.holder()
            raise BuildRunning(f"another process is building the catalog: {holder or 'a process'}; "
                               f"wait for it to finish, then run again", holder)
        yield


def connect(path: Path, read_only: bool = False, wait: float = BUSY_WAIT_S, **config):
    """duckdb.connect, retried while another process holds the file briefly; CatalogBusy after
    `wait` seconds, or at once when a catalog build holds it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise
            holder = read_holder(build_lock(path).path, attempts=1)
            if alive_elsewhere(holder):
                raise CatalogBusy(f"the catalog {path} is being built by another process: {holder}; "
                                  f"try again when it has finished") from error
            if time.monotonic() >= deadline:
                pid = re.search(r"\(PID (\d+)\)", str(error))
                raise CatalogBusy(f"the catalog {path} is open in another process"
                                  f"{f' (PID {pid.group(1)})' if pid else ''}; try again when it has closed it") \
                    from error
            time.sleep(0.2)

"""How a command reports a failure: one `error: <message>` line on stderr, then its exit status
(2 for input the command cannot use, the default; 1 where a run itself failed).

A write the file system refused (a full disk, a quota, permission denied, a read-only file system)
is told by its real cause, found anywhere in the exception's chain, however deeply a library
wrapped it (MLflow's SQLAlchemy errors wrap SQLite's as "Query-invoked autoflush" errors): one
line naming the path and the cause, exit 1.
"""

import errno
import logging
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn

import typer

from pipeline.messages import on_one_line  # noqa: F401  (the commands' one-line errors)

USAGE = 2
FAILED = 1
INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C (128 + SIGINT)

FILESYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG)
# SQLite's own words for the same causes (sqlite3.OperationalError, which carries no errno or path)
SQLITE_CAUSES = {"database or disk is full": errno.ENOSPC, "attempt to write a readonly database": errno.EROFS,
                 "unable to open database file": errno.EACCES}


def echo_error(message: BaseException | str) -> None:
    typer.echo(f"error: {message}", err=True)


def fail(error: BaseException | str, code: int = USAGE, hint: str | None = None) -> NoReturn:
    """Print the error (and a hint on where to look further), then exit with `code`; a refused
    write is told by its path and cause, exit 1."""
    cause = filesystem_cause(error) if isinstance(error, BaseException) else None
    echo_error(cause or error)
    if hint and not cause:
        typer.echo(hint, err=True)
    raise typer.Exit(FAILED if cause else code)


# Libraries that log the traceback of a database error before raising it (MLflow's SQL store)
LOGGING_TRACEBACKS = ("mlflow.store.db.utils",)


# Set by Ctrl-C (SIGINT) once `refused_writes_told` is in force: the cleanup after it may fail on a
# database the interrupted write still holds ("database is locked"); the command says what happened.
CTRL_C_SEEN = threading.Event()


class RefusedWriteFilter(logging.Filter):
    """Drops a library's log record of an error that is a refused write, or of any error after Ctrl-C:
    the command tells it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (CTRL_C_SEEN.is_set() or interrupted_in(error)):
            return False
        return error is None or filesystem_cause(error) is None


def refused_writes_unlogged() -> None:
    """Keep the libraries of LOGGING_TRACEBACKS from logging a refused write's traceback, and note Ctrl-C."""
    for name in LOGGING_TRACEBACKS:
        if not any(isinstance(item, RefusedWriteFilter) for item in logging.getLogger(name).filters):
            logging.getLogger(name).addFilter(RefusedWriteFilter())
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _note_interrupt)


def _note_interrupt(signum, frame) -> None:
    CTRL_C_SEEN.set()
    _prefect_console_quiet()
    stopping = sys.modules.get("ituning.stopping")
    if stopping is not None:  # a run in a worker thread, which the interrupt does not reach, stops at its next step
        stopping.request_stop()
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without this handler


class _NothingFromPrefect(logging.Filter):
    """Drops Prefect's records, also those of its services' loggers named by class ("EventsWorker")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("prefect") or f"{os.sep}prefect{os.sep}" in record.pathname)


def _prefect_console_quiet() -> None:
    """Prefect's console lines on what Ctrl-C cut short ("Crash detected!", a task that failed when its
    server went with the interrupt) stay off the terminal; the flow run's own log keeps what its server
    still takes. Handlers that cannot reach the stopped server stay quiet too ("Error logging to API").
    The temporary Prefect server shares the terminal's process group, so the interrupt stops it too:
    the run's last reports to it fail at once instead of retrying for minutes."""
    logging.raiseExceptions = False
    prefect_settings = sys.modules.get("prefect.settings")
    if prefect_settings is not None:
        prefect_settings.get_current_settings().client.max_retries = 0
    for handler in [*logging.getLogger().handlers, *logging.getLogger("prefect._internal").handlers]:
        handler.addFilter(_NothingFromPrefect())


@contextmanager
def refused_writes_told(database: Callable[[], str | None] = lambda: None) -> Iterator[None]:
    """Any exception whose chain holds a refused write (whatever wrapped it) ends the command with
    its one line; `database()` names the SQLite file a bare SQLite error is about. The libraries that
    would log its traceback first are kept from it."""
    refused_writes_unlogged()
    try:
        yield
    except typer.Exit:
        raise
    except Exception as error:
        if filesystem_cause(error) is None:
            raise
        echo_error(filesystem_cause(error, database()))
        raise typer.Exit(FAILED) from None


def filesystem_cause(error: BaseException, database: str | None = None) -> str | None:
    """"PATH: cause" for the first write the file system refused in the exception's chain; None when
    there is none."""
    for link in exception_chain(error):
        number = _errno_of(link)
        if number is not None:
            where = getattr(link, "filename", None) or _named_file(str(link))
            reason = os.strerror(number)
            return f"{where}: {reason}" if where else f"{reason} ({first_line(link)})"
        sqlite = next((number for words, number in SQLITE_CAUSES.items() if words in str(link).lower()), None)
        if sqlite is not None and type(link).__name__ == "OperationalError":
            cause = os.strerror(_refusal(database, sqlite))
            return f"{database or 'the SQLite database'}: {cause} (SQLite: {_sqlite_words(link)})"
    return None


def _refusal(database: str | None, said: int) -> int:
    """SQLite says "readonly" both for a read-only file system and for a file or folder it may not
    write: which one it is, as far as the file system tells."""
    if said == errno.ENOSPC or not database:
        return said
    folder = os.path.dirname(database) or "."
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return errno.EROFS
    except OSError:
        return said
    writable = os.access(folder, os.W_OK) and (not os.path.exists(database) or os.access(database, os.W_OK))
    return said if writable else errno.EACCES


def training_stopped(timeout_s: float = 600) -> None:
    """After Ctrl-C: wait (up to `timeout_s`) for the training runs of worker threads to stop at their
    next step, so that the checkpoint a rerun resumes from is on disk before the command says which."""
    stopping = sys.modules.get("ituning.stopping")
    if stopping is None:
        return
    stopping.request_stop()
    try:
        stopping.wait_for_stop(timeout_s)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        pass


def interrupted_in(error: BaseException) -> bool:
    """Whether Ctrl-C (KeyboardInterrupt) is in the exception's chain: an error raised while
    cleaning up after it."""
    return any(isinstance(link, KeyboardInterrupt) for link in exception_chain(error))


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """The error, then what it was raised from or during (and SQLAlchemy's wrapped `orig`), each once."""
    seen, todo = set(), [error]
    while todo:
        link = todo.pop(0)
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        todo += [getattr(link, "orig", None), link.__cause__, link.__context__]


def _errno_of(link: BaseException) -> int | None:
    """The errno of a refused write: an OSError's own, or one named in the message (HDF5 says
    `errno = 28`; Arrow only prints the system's words)."""
    if not isinstance(link, OSError):
        return None
    if link.errno in FILESYSTEM_ERRNOS:
        return link.errno
    text = str(link)
    named = re.search(r"errno = (\d+)", text)
    if named and int(named.group(1)) in FILESYSTEM_ERRNOS:
        return int(named.group(1))
    return next((number for number in FILESYSTEM_ERRNOS if os.strerror(number) in text), None)


def _named_file(text: str) -> str | None:
    found = re.search(r"name = '([^']+)'", text) or re.search(r"(?:file|path) '?(/[^\s',]+)", text)
    return found.group(1) if found else None


def _sqlite_words(link: BaseException) -> str:
    text = str(link).lower()
    return next(words for words in SQLITE_CAUSES if words in text)


def first_line(error: BaseException) -> str:
    """The message's first line (a flow run's error can carry a whole traceback)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

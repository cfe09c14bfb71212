"""Server-side errors in a service's log fail the test that started the service.

A server answers its client and logs what went wrong on its side: a green test can hide a scheduler
loop that fails every minute. Each fixture that starts a server (Prefect, MLflow, the model server,
PostgreSQL, moto) checks its log with `assert_clean_log` once the server has stopped.
"""

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

SERVER_ERROR = re.compile(
    r"Traceback \(most recent call last\)"
    r"|\b(?:ERROR|FATAL|PANIC|CRITICAL)\b"  # Python logging, uvicorn and PostgreSQL levels
    r"|Exception"
    r'|HTTP/[0-9.]+" 5\d\d\b'  # an access-log line of a 5xx response (uvicorn, werkzeug)
)
# (regex, why) for lines known to be harmless in every service's log; a fixture adds its own service's
# in `allowed`. None so far: each server-side error these logs have shown had a fix.
HARMLESS: tuple[tuple[str, str], ...] = ()
TRACEBACK_HEADER = "Traceback (most recent call last)"
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def log_entries(text: str) -> list[str]:
    """The log's records: a line with the indented or blank lines after it; a Python traceback, chained
    ones included, is one record up to its exception line."""
    entries: list[str] = []
    state = None  # in a traceback: "frames" before its exception line, "raised" after, "chained" between two
    for line in text.splitlines():
        continued = bool(entries) and (not line.strip() or line[:1].isspace())
        if not continued and state == "frames":
            continued, state = True, "frames" if line.startswith(TRACEBACK_HEADER) else "raised"
        elif not continued and state == "raised" and line.startswith(CHAINED):
            continued, state = True, "chained"
        elif not continued and state == "chained" and line.startswith(TRACEBACK_HEADER):
            continued, state = True, "frames"
        elif not continued:  # a traceback starts a line, or ends a log record's first line ("ERROR: Traceback ...")
            state = "frames" if TRACEBACK_HEADER in line else None
        if continued:
            entries[-1] += "\n" + line
        else:
            entries.append(line)
    return entries


def server_errors(text: str, allowed: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """The log entries that report a server-side error and match no allowed pattern."""
    patterns = [re.compile(pattern) for pattern, _why in HARMLESS + tuple(allowed)]
    return [entry for entry in log_entries(text)
            if SERVER_ERROR.search(entry) and not any(pattern.search(entry) for pattern in patterns)]


def _quoted(entry: str) -> str:
    lines = entry.splitlines()
    if len(lines) > 8:  # a traceback: where it starts and how it ends
        lines = lines[:2] + ["    ..."] + lines[-5:]
    return "\n".join(f"    {line}" for line in lines)


def assert_clean_log(log: Path, allowed: tuple[tuple[str, str], ...] = ()) -> None:
    """Fail naming the log and quoting its server-side errors; `allowed` holds (regex, why) pairs."""
    errors = server_errors(Path(log).read_text(errors="replace"), allowed) if Path(log).exists() else []
    shown = "\n".join(_quoted(entry) for entry in errors[:10])
    more = f"\n    ... and {len(errors) - 10} more" if len(errors) > 10 else ""
    assert not errors, f"{len(errors)} server-side error(s) in {log}:\n{shown}{more}"


@contextmanager
def output_to(log: Path):
    """Processes started inside this block inherit `log` as their stdout and stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "ab") as output:
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])

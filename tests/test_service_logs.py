"""The check the service fixtures run on their servers' logs (tests/service_logs.py)."""

import subprocess
import sys

import pytest

from tests.service_logs import assert_clean_log, log_entries, output_to, server_errors

SCHEDULER_FAILURE = """\
03:00:00.000 | INFO    | prefect.server - started
03:00:05.000 | ERROR   | docket.dependencies - schedule_deployments()
Traceback (most recent call last):
  File "worker.py", line 1134, in _execute
    await function()
KeyError: 'id'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "hybrid.py", line 1851, in prop
    raise exc.InvalidRequestError(
sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement
(Background on this error at: https://sqlalche.me/e/20/bhk3)
"""


def test_a_traceback_is_one_entry_up_to_its_last_exception():
    entries = log_entries(SCHEDULER_FAILURE)
    assert len(entries) == 4
    assert entries[2].startswith("Traceback") and entries[2].endswith("Can't evaluate bulk DML statement")
    assert "KeyError: 'id'" in entries[2]
    assert entries[3].startswith("(Background")


def test_a_traceback_opening_on_a_log_line_belongs_to_that_line():
    log = "2026/12/02 02:34:37 ERROR:    Traceback (most recent call last):\n  File \"a.py\"\nKeyboardInterrupt\nnext"
    assert log_entries(log) == [log.rsplit("\n", 1)[0], "next"]


@pytest.mark.parametrize("line", [
    '2026/12/02 02:34:36 INFO:     127.0.0.1:46120 - "POST /api/2.0/mlflow/runs/create HTTP/1.1" 500 Internal Error',
    '127.0.0.1 - - [02/Dec/2026 02:34:37] "PUT /bucket/key HTTP/1.1" 503 -',
    "2026-12-02 02:34:13.626 UTC [14343] ERROR:  relation \"runs\" does not exist",
    "2026-12-02 02:34:13.626 UTC [14343] FATAL:  role \"x\" does not exist",
    "Exception in ASGI application",
])
def test_server_side_errors_are_found(line):
    assert server_errors(f"INFO: up\n{line}\nINFO: down") == [line]


@pytest.mark.parametrize("line", [
    '2026/12/02 02:34:36 INFO:     127.0.0.1:46120 - "GET /api/2.0/mlflow/experiments/get HTTP/1.1" 404 Not Found',
    '127.0.0.1 - - [02/Dec/2026 02:34:37] "GET /bucket/key HTTP/1.1" 206 -',
    "2026-12-02 02:34:44.458 UTC [14343] LOG:  received fast shutdown request",
])
def test_client_errors_and_ordinary_lines_are_not_server_errors(line):
    assert server_errors(line) == []


def test_allowed_lines_pass_and_the_failure_names_the_log_and_quotes_the_rest(tmp_path):
    log = tmp_path / "prefect-server.log"
    log.write_text(SCHEDULER_FAILURE)
    allowed = ((r"docket\.dependencies - schedule_deployments", "only for this test"),)
    with pytest.raises(AssertionError) as failure:
        assert_clean_log(log, allowed)
    message = str(failure.value)
    assert str(log) in message and "1 server-side error(s)" in message
    assert "sqlalchemy.exc.InvalidRequestError: Can't evaluate bulk DML statement" in message
    assert "schedule_deployments" not in message
    assert_clean_log(tmp_path / "never-written.log")  # a service that logged nothing


def test_processes_started_under_output_to_write_to_the_log(tmp_path):
    log = tmp_path / "server.log"
    with output_to(log):
        child = subprocess.Popen([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    child.wait(timeout=60)
    print("after the block")  # the test's own output is not redirected any more
    assert log.read_text().split() == ["out", "err"]

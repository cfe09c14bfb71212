"""What of the project's own logging reaches a flow run's log (the Prefect UI): the INFO lines of
the `ituning` loggers, above all `ituning.progress` (ituning/progress.py), sent while a flow or
task run is current. On a terminal the progress bars show the same; without a terminal (a worker,
output sent to a file) the progress lines are printed on stderr as well."""

import logging
import sys

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

PROJECT_LOGGER = "ituning"
PROGRESS_LOGGER = "ituning.progress"


class RunLogHandler(APILogHandler):
    """Prefect's API handler, for records made while a flow or task run is current (others are
    not a run's business and would only raise Prefect's missing-context warning)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            super().emit(record)


class ProgressLines(logging.StreamHandler):
    """Progress lines on stderr, for where no bar can be drawn."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
        self.addFilter(lambda record: record.levelno == logging.INFO)

    @property
    def stream(self):
        return sys.stderr  # whatever stderr is when a line is written (it may be replaced meanwhile)

    @stream.setter
    def stream(self, value) -> None:
        pass


def carry_project_logs_into_runs() -> None:
    """`ituning.progress` at INFO into the run's log (and onto stderr without a terminal), kept apart
    from the root logger; the project's warnings into the run's log as well."""
    project = logging.getLogger(PROJECT_LOGGER)
    if not any(isinstance(handler, RunLogHandler) for handler in project.handlers):
        project.addHandler(RunLogHandler())
    progress = logging.getLogger(PROGRESS_LOGGER)
    progress.setLevel(logging.INFO)
    progress.propagate = False  # its own destinations below, not whatever the root logger prints
    if not any(isinstance(handler, RunLogHandler) for handler in progress.handlers):
        progress.addHandler(RunLogHandler())
    if not sys.stderr.isatty() and not any(isinstance(handler, ProgressLines) for handler in progress.handlers):
        progress.addHandler(ProgressLines())

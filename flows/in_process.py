"""full-pipeline run in the calling process, as `ituning pipeline` and `ituning demo` run it: a
temporary Prefect server starts by itself when PREFECT_API_URL is unset, and the console shows a
failed task or flow as one line."""

import logging

from prefect.exceptions import ParameterTypeError
from prefect.logging.handlers import PrefectConsoleHandler

from flows.full_pipeline import full_pipeline


def run_full_pipeline(**parameters) -> dict:
    """ValueError, with every refused parameter on one line, before any run starts when the flow's
    schema refuses the parameters."""
    try:
        full_pipeline.validate_parameters(parameters)
    except ParameterTypeError as error:
        raise ValueError(" ".join(str(error).split())) from None
    console_errors_on_one_line()
    return full_pipeline(**parameters)


def console_errors_on_one_line() -> None:
    """Prefect's console shows a failed task or flow as one line; its traceback still goes to the
    flow run's log on the server."""
    for logger in (logging.getLogger(name) for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.setFormatter(OneLineFormatter(handler.formatter))


class OneLineFormatter(logging.Formatter):
    """The wrapped formatter's text without the exception's traceback."""

    def __init__(self, wrapped: logging.Formatter | None):
        super().__init__()
        self.wrapped = wrapped or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.wrapped.format(record).splitlines()[0]
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved

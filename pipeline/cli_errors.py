"""How a command reports a failure: one `error: <message>` line on stderr, then its exit status
(2 for input the command cannot use, the default; 1 where a run itself failed)."""

from typing import NoReturn

import typer

USAGE = 2


def echo_error(message: BaseException | str) -> None:
    typer.echo(f"error: {message}", err=True)


def fail(error: BaseException | str, code: int = USAGE, hint: str | None = None) -> NoReturn:
    """Print the error (and a hint on where to look further), then exit with `code`."""
    echo_error(error)
    if hint:
        typer.echo(hint, err=True)
    raise typer.Exit(code)


def first_line(error: BaseException) -> str:
    """The message's first line (a flow run's error can carry a whole traceback)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def on_one_line(error: BaseException) -> str:
    """The message with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(error).split())

"""`ituning sync`: send what the tracking server missed while it was down."""

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import fail, on_one_line

STILL_UNREACHABLE = 1


def sync(workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace")):
    """Send the metrics, params, tags, artifacts, run endings and model registrations kept in
    WORKSPACE/tracking-outbox while the tracking server could not be reached, each once and in order. Exits 1 while the server
    still does not answer (what it took stays sent; run it again later)."""
    from pipeline.registry import register_waiting
    from pipeline.tracking_outbox import Outbox, sync as send_outbox, unreachable

    try:
        typer.echo(send_outbox(workspace))
        for line in register_waiting(workspace):
            typer.echo(line)
    except Exception as error:
        if not unreachable(error):
            fail(on_one_line(error), code=STILL_UNREACHABLE)
        outbox = Outbox(workspace, "", "")
        waiting = f"{len(outbox.pending())} kept call(s)"
        if outbox.waiting_registrations():
            waiting += f" and {len(outbox.waiting_registrations())} model registration(s)"
        fail(f"the tracking server is still unreachable; {waiting} wait in {outbox.folder}: run `ituning sync` "
             "again once it answers", code=STILL_UNREACHABLE)

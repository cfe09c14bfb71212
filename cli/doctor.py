"""`ituning doctor`: whether this machine can run the pipeline, one row per item (pipeline/doctor.py)."""

import json
from pathlib import Path
from typing import Annotated

import typer


def doctor(
    workspace: Annotated[Path | None, typer.Option(help="default ./workspace or $ITUNING_WORKSPACE")] = None,
    device: Annotated[str, typer.Option(help="the device whose fast paths are checked: auto, cpu, cuda ...")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="the rows as JSON, for a bug report")] = False,
):
    """Check the machine before a long job and for a bug report: versions, GPU, Java and SPICE, the
    Hugging Face cache, the workspace, the MLflow and Prefect servers, and each fast path (on here or
    not, and its check on a tiny model). Exits 1 when something the main job needs is missing."""
    from pipeline.doctor import as_dicts, as_table, diagnose, ready

    rows = diagnose(workspace, device)
    can_run = ready(rows)
    if as_json:
        typer.echo(json.dumps({"ready": can_run, "rows": as_dicts(rows)}, indent=1))
    else:
        typer.echo(as_table(rows))
        typer.echo("ready: the pipeline can run here" if can_run else
                   "not ready: fix the rows marked fail before running the pipeline")
    if not can_run:
        raise typer.Exit(1)

"""`ituning serve` / `ituning stop`: the local Prefect and MLflow servers (see cli/services.py)."""

from pathlib import Path
from typing import Annotated

import typer

WorkspaceOption = Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE", help="workspace folder")]


def serve(
    workspace: WorkspaceOption = Path("workspace"),
    prefect_port: Annotated[int, typer.Option(envvar="ITUNING_PREFECT_PORT")] = 4200,
    mlflow_port: Annotated[int, typer.Option(envvar="ITUNING_MLFLOW_PORT")] = 5000,
    app_port: Annotated[int, typer.Option(envvar="ITUNING_APP_PORT")] = 7860,
):
    """Start Prefect (server, work pool, worker, deployments), the MLflow UI and the captioner's web
    page (on the registry's champion) on 127.0.0.1."""
    from cli.services import ServiceSettings, start_all

    settings = ServiceSettings(workspace, prefect_port=prefect_port, mlflow_port=mlflow_port, app_port=app_port)
    start_all(settings)
    typer.echo(f"Prefect UI: http://127.0.0.1:{prefect_port}   MLflow UI: {settings.mlflow_url}   "
               f"Captioner: {settings.app_url}")
    typer.echo(f"In your shell: . {settings.directory / 'env.sh'}   then: prefect deployment run full-pipeline/demo --watch")


def stop(workspace: WorkspaceOption = Path("workspace")):
    """Stop the servers started by `ituning serve` (the worker first)."""
    from cli.services import ServiceSettings, stop_all

    stopped = stop_all(ServiceSettings(workspace))
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")

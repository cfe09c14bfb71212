"""`ituning demo` / `ituning pipeline`: the full pipeline in this process (a temporary Prefect
server starts by itself when PREFECT_API_URL is unset), then what came out and where to look."""

import os
from pathlib import Path
from typing import Annotated

import typer

QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
         "HF_HUB_OFFLINE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}


def pipeline(
    config: Annotated[str, typer.Option(help="a preset of configs/")] = "demo",
    source: Annotated[str, typer.Option(help="synthetic (offline corpus) or download")] = "synthetic",
    workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace"),
    synthetic_images: Annotated[int, typer.Option()] = 600,
    device: Annotated[str, typer.Option()] = "auto",
):
    """Run full-pipeline: data, catalog, features, training, evaluation, registration."""
    workspace = workspace.resolve()
    (workspace / "prefect").mkdir(parents=True, exist_ok=True)
    for key, value in {**QUIET, "PREFECT_HOME": str(workspace / "prefect")}.items():
        os.environ.setdefault(key, value)  # read when prefect is first imported, just below
    from flows.full_pipeline import full_pipeline

    typer.echo(f"Running full-pipeline ({config}) in {workspace}; finished stages are reused ...")
    outcome = full_pipeline(config=config, source=source, workspace=str(workspace),
                            synthetic_images=synthetic_images, device=device)
    print_outcome(outcome, workspace)


def demo(workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace")):
    """The offline demo: full-pipeline on the synthetic corpus with the demo backbones."""
    pipeline(config="demo", source="synthetic", workspace=workspace, synthetic_images=600, device="auto")


def print_outcome(outcome: dict, workspace: Path) -> None:
    from storage.tracking import tracking_uri

    for record in outcome["stages"]:
        state = "reused" if record["cached"] else "ran"
        typer.echo(f"  {record['stage']:<22} {state:<7} run {record['run_id']}")
    typer.echo("Test metrics:")
    for name, value in outcome["test"].items():
        if isinstance(value, (int, float)):
            typer.echo(f"  {name:<8} {value:.4f}")
    typer.echo("Captions:")
    for image_id, caption in outcome["sample"]:
        typer.echo(f"  {image_id}\t{caption}")
    model, promotion = outcome["model"], outcome["promotion"]
    typer.echo(f"Registered {model['name']} version {model['version']} ({model['model_uri']}); "
               f"champion {'moved to it' if promotion['promoted'] else 'kept'}")
    uri = tracking_uri(workspace)
    typer.echo("Where to look:")
    typer.echo(f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    typer.echo(f"  Prefect UI: make serve   (then http://127.0.0.1:4200: flow runs, the summary artifact)")
    typer.echo(f"  Files:      {workspace}")

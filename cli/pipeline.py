"""`ituning demo` / `ituning pipeline`: the full pipeline in this process (a temporary Prefect
server starts by itself when PREFECT_API_URL is unset), then what came out and where to look."""

import os
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import fail, filesystem_cause, first_line, interrupted_in, refused_writes_unlogged
from cli.training import WAIT_HELP, stop_interrupted, tracking_database
from pipeline.step_locks import set_step_wait
from storage.locks import StepBusy
from storage.datasets import dataset_names

QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
         # Prefect's INFO lines go to the flow run's log (the UI) but not to the terminal, which shows
         # the progress bars; MLflow's artifact bars only show local copies.
         "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
         "MLFLOW_LOGGING_LEVEL": "WARNING",
         # The temporary server's first start (database migrations) can outlast Prefect's 20 s on a busy machine.
         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
DEMO = "demo"
OFFLINE = {"HF_HUB_OFFLINE": "1"}
FLOW_LOG = "The flow run's full log: `make serve`, then the Prefect UI at http://127.0.0.1:4200"


SET_HELP = "KEY=VALUE: change one setting of the config, read as YAML (repeatable), e.g. stages[0].epochs=3"


def pipeline_environment(config: str, workspace: Path, overrides: list[str] = ()) -> dict[str, str]:
    """What `pipeline` sets where the environment leaves it unset, before Prefect and huggingface_hub
    read it. A config whose backbones are stand-ins built in the workspace (the demo) runs offline;
    every other downloads its backbones (GPT-2, CLIP) from the Hugging Face hub on first use, into
    HF_HOME's cache."""
    offline = OFFLINE if uses_standins(config, overrides) else {}
    return {**QUIET, **offline, "PREFECT_HOME": str(workspace / "prefect")}


def uses_standins(config: str, overrides: list[str] = ()) -> bool:
    """Whether the config (with its overrides, checked here first) runs on stand-in backbones."""
    from ituning.config import ConfigError
    from pipeline.presets import config_file, load_run_config

    try:
        return load_run_config(config_file(config), list(overrides)).model.standins
    except (ConfigError, OSError) as error:
        raise typer.BadParameter(str(error), param_hint="--config / --set") from error


def pipeline(
    config: Annotated[str, typer.Option(help="a preset of configs/")] = DEMO,
    source: Annotated[str, typer.Option(help="synthetic (offline corpus) or download")] = "synthetic",
    workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace"),
    synthetic_images: Annotated[int, typer.Option()] = 600,
    device: Annotated[str, typer.Option()] = "auto",
    manifest: Annotated[list[str] | None, typer.Option(
        help="DATASET=FILE: a manifest JSON replacing the dataset's built-in downloads (repeatable)")] = None,
    corpus: Annotated[list[str] | None, typer.Option(
        help="DATASET=FOLDER: the dataset already on disk in its published layout, used in place (repeatable)")] = None,
    register_as: Annotated[str | None, typer.Option(help="registered model name; default ituning-<preset>")] = None,
    evaluate_on: Annotated[list[str] | None, typer.Option(
        help="a split to score the final checkpoint on: test, val, coco/test, nocaps/val ... (repeatable; "
             "default test)")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="images per feature-cache shard")] = 1024,
    gallery_size: Annotated[int, typer.Option(min=0, help="images in each evaluation's caption gallery")] = 50,
    backbone_steps: Annotated[int, typer.Option(min=1, help="training steps of each demo stand-in backbone")] = 100,
    set_: Annotated[list[str] | None, typer.Option("--set", help=SET_HELP)] = None,
    wait: Annotated[float | None, typer.Option(min=0, help=WAIT_HELP)] = None,
):
    """Run full-pipeline: data, catalog, features, training, evaluation, registration. Backbones are
    downloaded from the Hugging Face hub on first use (the demo's are built locally, offline).
    Datasets already downloaded and verified in the workspace are reused."""
    manifests, corpora = dataset_paths(manifest, "--manifest", "file"), dataset_paths(corpus, "--corpus", "dir")
    workspace = workspace.resolve()
    set_step_wait(wait)  # read by the flow's steps in this process
    refused_writes_unlogged()
    (workspace / "prefect").mkdir(parents=True, exist_ok=True)
    for key, value in pipeline_environment(config, workspace, set_ or []).items():
        os.environ.setdefault(key, value)  # read when prefect is first imported, by the import below
    from flows.in_process import run_full_pipeline as run_in_process  # imports prefect, which reads them
    typer.echo(f"Running full-pipeline ({config}) in {workspace}; finished steps are reused ...")
    try:
        outcome = run_in_process(config=config, source=source, workspace=str(workspace), synthetic_images=synthetic_images,
                                device=device, manifests=manifests, corpora=corpora, register_as=register_as,
                                evaluate_on=evaluate_on or ["test"], shard_size=shard_size, gallery_size=gallery_size,
                                backbone_steps=backbone_steps, overrides=set_ or None)
    except KeyboardInterrupt:
        stop_interrupted(config, workspace, None)
    except StepBusy as error:
        fail(error, 1)
    except Exception as error:  # the whole traceback stays in the flow run's log
        if interrupted_in(error):
            stop_interrupted(config, workspace, None)
        cause = filesystem_cause(error, tracking_database(workspace))  # a refused write: its path and cause
        fail(cause or first_line(error), 1, hint=None if cause else FLOW_LOG)
    print_outcome(outcome, workspace)


def dataset_paths(values: list[str] | None, option: str, kind: str) -> dict[str, str]:
    """["coco=/data/x.json", ...] as {"coco": "/data/x.json"}, each name and path checked."""
    chosen = {}
    for value in values or ():
        dataset, separator, path = value.partition("=")
        if not separator or dataset not in dataset_names():
            raise typer.BadParameter(f"{value!r}: expected DATASET=PATH with DATASET one of "
                                     f"{', '.join(dataset_names())}", param_hint=option)
        found = Path(path).expanduser()
        if not (found.is_file() if kind == "file" else found.is_dir()):
            raise typer.BadParameter(f"{path}: no such {'file' if kind == 'file' else 'folder'}", param_hint=option)
        chosen[dataset] = str(found.resolve())
    return chosen


def demo(workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace")):
    """The offline demo: full-pipeline on the synthetic corpus with the demo backbones."""
    pipeline(config=DEMO, source="synthetic", workspace=workspace, synthetic_images=600, device="auto")


def shown_state(record: dict) -> str:
    """ran, reused (cached, or a stage already trained on these inputs) or rebuilt (a feature cache
    whose damaged shards were encoded again)."""
    if record.get("rebuilt"):
        return "rebuilt"
    return "reused" if record["cached"] or record.get("already_done") else "ran"


def print_outcome(outcome: dict, workspace: Path) -> None:
    from pipeline.registry import registration_note
    from pipeline.tracking import tracking_uri

    for record in [*outcome.get("data", []), *outcome["steps"]]:
        state = shown_state(record)
        run = f"run {record['run_id']}" if record.get("run_id") else ""
        typer.echo(f"  {record['step']:<22} {state:<7} {run}".rstrip())
    typer.echo("Test metrics:")
    for name, value in outcome["test"].items():
        if isinstance(value, (int, float)):
            typer.echo(f"  {name:<8} {value:.4f}")
    typer.echo("Captions:")
    for image_id, caption in outcome["sample"]:
        typer.echo(f"  {image_id}\t{caption}")
    typer.echo(registration_note(outcome["model"], outcome["promotion"]))
    uri = tracking_uri(workspace)
    typer.echo("Where to look:")
    typer.echo(f"  MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {uri}   (then http://127.0.0.1:5000)")
    typer.echo("  Prefect UI: make serve   (then http://127.0.0.1:4200: flow runs, the summary artifact)")
    typer.echo(f"  Files:      {workspace}")

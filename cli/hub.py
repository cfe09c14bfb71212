"""Sharing a model: `push` puts a checkpoint on the Hugging Face hub with its model card."""

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import fail, on_one_line

HUB_FAILED = 1  # the hub refused or could not be reached


def push(
    checkpoint: Annotated[Path, typer.Argument(
        help="I-Tuning checkpoint folder (adapter_model.safetensors + adapter_config.json)")],
    repo: Annotated[str, typer.Argument(help="hub repository OWNER/NAME, created if missing")],
    run: Annotated[str | None, typer.Option(
        help="the MLflow run that produced the checkpoint: its data sets and scores go into the model card "
             "(a pipeline run's steps count too)")] = None,
    workspace: Annotated[Path | None, typer.Option(
        help="whose tracking store --run is in (default $MLFLOW_TRACKING_URI, else $ITUNING_WORKSPACE or "
             "./workspace)")] = None,
    private: Annotated[bool, typer.Option("--private", help="create the repository private, or make an existing "
                                                           "one private")] = False,
    branch: Annotated[str | None, typer.Option(
        "--branch", "--revision", help="push to this branch, made from main if missing (default main)")] = None,
):
    """Share a checkpoint on the Hugging Face hub: its weights, config and a model card (base models,
    trainable parameters, data sets and scores, licence; synthetic data and stand-in backbones said as
    such), in one commit; prints the repository's URL. The hub
    is $HF_ENDPOINT (default huggingface.co), the token $HF_TOKEN or that of `hf auth login`. Load it
    back with `ituning caption --model hub:OWNER/NAME IMAGE` or Captioner.from_pretrained("OWNER/NAME").
    A hub failure exits 1; a bad repository id, an unusable checkpoint or run, 2."""
    from pipeline.model_card import BadRepoId, HubError
    from pipeline.model_sources import push_checkpoint

    try:
        commit = push_checkpoint(checkpoint, repo, run, workspace, private, branch)
    except BadRepoId as error:
        fail(on_one_line(error))
    except HubError as error:
        fail(on_one_line(error), code=HUB_FAILED)
    except Exception as error:  # a missing or foreign checkpoint, backbones it cannot load, an unknown run
        fail(on_one_line(error))
    typer.echo(f"{commit.repo_url}/tree/{branch}" if branch else commit.repo_url)

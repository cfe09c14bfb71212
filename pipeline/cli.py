"""The `ituning` command line: a dispatcher over the command modules pipeline/cli_*.py."""

from typing import Annotated

import typer

from pipeline.cli_app import serve_app
from pipeline.cli_collection import caption_collection
from pipeline.cli_compare import compare
from pipeline.cli_data import register as register_dataset_commands
from pipeline.cli_doctor import doctor
from pipeline.cli_evaluation import score
from pipeline.cli_features import features_app
from pipeline.cli_hub import push
from pipeline.cli_model import caption, params
from pipeline.cli_pipeline import demo, pipeline
from pipeline.cli_services import serve, stop
from pipeline.cli_sync import sync
from pipeline.cli_training import evaluate, standins, train

app = typer.Typer(help="I-Tuning: lightweight image captioning on frozen CLIP-ViT and GPT-2.",
                  no_args_is_help=True, pretty_exceptions_enable=False)



def show_version(value: bool) -> None:
    if value:
        from ituning.version import code_version

        typer.echo(f"ituning {code_version()}")
        raise typer.Exit()


@app.callback()
def options(version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                                  help="print the version (and the git commit of a checkout) and exit")]
            = False):
    """I-Tuning: lightweight image captioning on frozen CLIP-ViT and GPT-2."""


app.add_typer(features_app, name="features")
register_dataset_commands(app)
app.command()(params)
app.command()(caption)
app.command(name="caption-collection")(caption_collection)
app.command()(push)
app.command()(score)
app.command()(train)
app.command()(evaluate)
app.command()(compare)
app.command()(standins)
app.command()(serve)
app.command()(stop)
app.command()(sync)
app.command(name="app")(serve_app)
app.command()(demo)
app.command()(pipeline)
app.command()(doctor)


def main():
    app()

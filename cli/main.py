"""The `ituning` command line: a dispatcher over the command modules of cli/."""

from typing import Annotated

import typer

from cli.app import serve_app
from cli.collection import caption_collection
from cli.compare import compare
from cli.data import register as register_dataset_commands
from cli.doctor import doctor
from cli.evaluation import score
from cli.features import features_app
from cli.hub import push
from cli.model import caption, params
from cli.pipeline import demo, pipeline
from cli.serve import serve, stop
from cli.sync import sync
from cli.training import evaluate, standins, train

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
    app(prog_name="ituning")  # also when started as `python -m cli`

"""The `ituning` command line."""

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli_data import register as register_dataset_commands
from pipeline.cli_evaluation import score
from pipeline.cli_features import features_app
from pipeline.cli_pipeline import demo, pipeline
from pipeline.cli_services import serve, stop
from pipeline.cli_training import evaluate, standins, train

app = typer.Typer(help="I-Tuning: lightweight image captioning on frozen CLIP-ViT and GPT-2.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

app.add_typer(features_app, name="features")


@app.command()
def params(
    lm: Annotated[str, typer.Option(help="GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or local folder")] = "gpt2",
    drop_first: Annotated[int, typer.Option(min=0, help="I-Tuning Dropping: no modules in the first K layers")] = 0,
    vision: Annotated[str, typer.Option(help="open_clip model name or local-dir:PATH")] = "ViT-B-16",
    bottleneck: Annotated[int | None, typer.Option(min=1, help="r; default d_model / 2")] = None,
):
    """Print the number of trainable parameters (nothing is downloaded)."""
    from ituning.backbones import BackboneUnavailable
    from ituning.captioner import trainable_count

    try:
        count = trainable_count(lm, vision, drop_first, bottleneck)
    except (BackboneUnavailable, ValueError) as error:
        _fail(error)
    typer.echo(f"{count:,}")


@app.command()
def caption(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    checkpoint: Annotated[Path, typer.Option(help="I-Tuning checkpoint folder")],
    beams: Annotated[int, typer.Option(min=1, help="beam size; 1 is greedy")] = 5,
    max_length: Annotated[int, typer.Option(min=1, help="maximum new tokens")] = 20,
    min_length: Annotated[int, typer.Option(min=0)] = 0,
    length_penalty: Annotated[float, typer.Option()] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
):
    """Print one caption per image: `PATH<TAB>caption`. An unreadable file (missing, not an image,
    over PIL's pixel limit) gets a one-line error on stderr and exit status 1; the others are captioned."""
    from ituning.captioner import Captioner
    from ituning.decoding import DecodingConfig

    try:
        decoding = DecodingConfig(beams, max_length, min_length, length_penalty)
        captioner = Captioner.from_checkpoint(checkpoint, device)
    except (OSError, ValueError, RuntimeError) as error:
        _fail(error)
    results = captioner.caption_files(images, decoding, batch_size)
    for path, text, error in results:
        if error is None:
            typer.echo(f"{path}\t{text}")
        else:
            typer.echo(f"error: {error}", err=True)
    if any(error for _, _, error in results):
        raise typer.Exit(1)


register_dataset_commands(app)
app.command()(score)
app.command()(train)
app.command()(evaluate)
app.command()(standins)
app.command()(serve)
app.command()(stop)
app.command()(demo)
app.command()(pipeline)


def _fail(error: Exception):
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def main():
    app()

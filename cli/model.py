"""Commands on a model itself: its size (`params`) and captions for image files (`caption`)."""

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import echo_error, fail, on_one_line


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
        fail(error)
    typer.echo(f"{count:,}")


def caption(
    images: Annotated[list[str], typer.Argument(help="image files or http(s) URLs")],
    checkpoint: Annotated[Path | None, typer.Option(help="I-Tuning checkpoint folder")] = None,
    model: Annotated[str | None, typer.Option(help="a registered, logged or shared model instead of a checkpoint: "
                                                   "models:/ituning-captioner@champion, models:/NAME/VERSION, "
                                                   "runs:/RUN_ID/model, NAME@ALIAS, or hub:OWNER/NAME (hub:OWNER/NAME@REVISION "
                                                   "for a branch, tag or commit) from the Hugging Face hub")] = None,
    workspace: Annotated[Path | None, typer.Option(help="whose tracking store --model is in (default "
                                                        "$MLFLOW_TRACKING_URI, else $ITUNING_WORKSPACE or ./workspace)")] = None,
    beams: Annotated[int, typer.Option(min=1, help="beam size; 1 is greedy")] = 5,
    max_length: Annotated[int, typer.Option(min=1, help="maximum new tokens")] = 20,
    min_length: Annotated[int, typer.Option(min=0)] = 0,
    length_penalty: Annotated[float, typer.Option()] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
):
    """Print one caption per image: `IMAGE<TAB>caption`. An image that cannot be used (missing, not
    an image, over PIL's pixel limit, a URL that fails) gets a one-line error on stderr and exit
    status 1; the others are captioned."""
    from ituning.decoding import DecodingConfig

    if (checkpoint is None) == (model is None):
        fail("give either --checkpoint FOLDER or --model URI")
    try:
        decoding = DecodingConfig(beams, max_length, min_length, length_penalty)
        captioner = _load_captioner(checkpoint, model, workspace, device)
    except Exception as error:  # a missing folder, an unknown model or version, an unreadable store
        fail(on_one_line(error))
    with tempfile.TemporaryDirectory(prefix="ituning-caption-") as folder:
        files, failed = _local_files(images, Path(folder))
        results = captioner.caption_files(list(files.values()), decoding, batch_size) if files else []
    shown_as = {str(path): given for given, path in files.items()}
    for path, text, error in results:
        if error is None:
            typer.echo(f"{shown_as.get(str(path), path)}\t{text}")
        else:
            echo_error(str(error).replace(str(path), shown_as.get(str(path), str(path))))
    for error in failed:
        echo_error(error)
    if failed or any(error for _, _, error in results):
        raise typer.Exit(1)


def _load_captioner(checkpoint: Path | None, model: str | None, workspace: Path | None, device: str):
    if model is not None:
        from pipeline.model_sources import load_captioner_from

        return load_captioner_from(model, workspace, device)
    from ituning.captioner import Captioner

    return Captioner.from_checkpoint(checkpoint, device)


def _local_files(images: list[str], folder: Path) -> tuple[dict[str, Path], list[str]]:
    """{as given: local file} in the order given, URLs fetched into `folder`; and the fetch failures."""
    from pipeline.image_urls import ImageFetchError, fetch_image, is_image_url, local_name

    files, failed = {}, []
    for index, image in enumerate(images):
        if not is_image_url(image):
            files[image] = Path(image)
            continue
        try:
            files[image] = fetch_image(image, folder / local_name(image, index))
        except ImageFetchError as error:
            failed.append(str(error))
    return files, failed

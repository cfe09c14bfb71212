"""`ituning caption-collection`: captions for a whole collection into Parquet shards (pipeline/collection.py).

    ituning caption-collection photos/ --model ituning-captioner@champion --out captions/
    ituning caption-collection 'laion/{00000..00099}.tar' --model hub:OWNER/NAME --out captions/ --clip ViT-B-32 \\
        --clip-pretrained openai --rerank clip
    duckdb -c "SELECT status, count(*) FROM 'captions/*.parquet' GROUP BY status"
"""

import os
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import FAILED, fail, on_one_line


def caption_collection(
    source: Annotated[str, typer.Argument(help="a folder of images, a .txt/.csv/.parquet list of paths or URLs "
                                               "(img2dataset's), or WebDataset .tar shards, local or http(s), "
                                               "several as 'shards/{00000..00009}.tar'")],
    model: Annotated[str, typer.Option(help="a checkpoint folder, NAME@ALIAS, models:/..., runs:/... "
                                            "or hub:OWNER/NAME")],
    out: Annotated[Path, typer.Option(help="the folder of Parquet shards (one collection and one setting each)")],
    workspace: Annotated[Path | None, typer.Option(help="whose tracking store --model and the run are in "
                                                        "(default $MLFLOW_TRACKING_URI, else ./workspace)")] = None,
    beams: Annotated[int, typer.Option(min=1, help="beam size; 1 is greedy")] = 5,
    max_length: Annotated[int, typer.Option(min=1, help="maximum new tokens")] = 20,
    min_length: Annotated[int, typer.Option(min=0)] = 0,
    length_penalty: Annotated[float, typer.Option()] = 1.0,
    clip: Annotated[str | None, typer.Option(help="a CLIP to score every beam with (CLIP-S): an open_clip name, "
                                                  "hf-hub:ORG/NAME or local-dir:PATH")] = None,
    clip_pretrained: Annotated[str | None, typer.Option(help="the CLIP's pretrained tag, e.g. openai")] = None,
    rerank: Annotated[str, typer.Option(help="none: the most likely beam; clip: the beam with the highest CLIP-S")]
    = "none",
    shard_size: Annotated[int, typer.Option(min=1, help="images per shard of a folder or list (a tar is a shard)")]
    = 1000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    workers: Annotated[int, typer.Option(min=0, help="image decoding processes")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    max_image_mb: Annotated[float, typer.Option(min=0.001, help="largest image fetched or read from a tar")] = 20.0,
    per_host: Annotated[int, typer.Option(min=1, help="connections at once to one host")] = 4,
    allow_private_urls: Annotated[bool, typer.Option(help="fetch URLs from loopback and private hosts too "
                                                          "(only for your own machine or network)")] = False,
):
    """Caption every image of a collection into Parquet, one file per shard: a rerun skips finished
    shards; an image that cannot be captioned is a row with its status and reason."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # before MLflow is imported: no store set-up lines
    from pipeline.collection import CollectionSettings
    from pipeline.collection import caption_collection as run

    try:
        settings = CollectionSettings(model, beams, max_length, min_length, length_penalty, rerank, clip,
                                      clip_pretrained, shard_size, batch_size, workers, device,
                                      str(workspace) if workspace else None, int(max_image_mb * 1024 * 1024),
                                      per_host, allow_private_urls)
    except ValueError as error:
        fail(error)
    if allow_private_urls:
        typer.echo("fetching URLs from any host, loopback and private ones included (--allow-private-urls)", err=True)
    summary = _run(run, source, out, settings)
    statuses = ", ".join(f"{count} {status}" for status, count in summary["statuses"].items() if count)
    speed = summary["run"]
    typer.echo(f"{summary['images']} images in {summary['shards']} shards ({statuses or 'none'}); this run: "
               f"{speed['images']} images in {speed['seconds']:.1f} s ({speed['images_per_s'] or 0:.1f} images/s), "
               f"{speed['shards_reused']} shards reused")
    typer.echo(f"wrote {out}/*.parquet and {out}/summary.json; MLflow run {summary['mlflow_run_id']}")


def _run(run, source: str, out: Path, settings):
    from pipeline.collection_output import CollectionMismatch
    from storage.collection_sources import CollectionSourceError
    from storage.locks import StepBusy

    try:
        return run(source, out, settings)
    except (CollectionSourceError, CollectionMismatch) as error:
        fail(error)
    except StepBusy as error:
        fail(error, FAILED)
    except Exception as error:  # a model that does not load, a tar that cannot be fetched or read
        fail(on_one_line(error), FAILED)

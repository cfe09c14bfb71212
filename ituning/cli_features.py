"""`ituning features`: frozen vision tokens of a split, cached in HDF5 (see storage/features.py).

    ituning features --dataset coco --split train                 # encode, resume or reuse
    ituning features --dataset coco --split train --part 1/4 --device cuda:1   # one of four workers
    ituning features verify --dataset coco --split train
"""

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

features_app = typer.Typer(help="Frozen vision tokens of a split, cached in HDF5 shards.",
                           invoke_without_command=True, pretty_exceptions_enable=False)

DatasetOption = Annotated[str | None, typer.Option(help="coco, flickr30k, vg or nocaps")]
SplitOption = Annotated[str | None, typer.Option(help="train, val, test or pretrain")]
WorkspaceOption = Annotated[Path | None, typer.Option(help="default ./workspace or $ITUNING_WORKSPACE")]
VisionOption = Annotated[str, typer.Option(help="open_clip model name or local-dir:PATH")]
PretrainedOption = Annotated[str, typer.Option(help="open_clip pretrained tag or weights file; 'none' for random")]


@features_app.callback()
def features(
    ctx: typer.Context,
    dataset: DatasetOption = None,
    split: SplitOption = None,
    workspace: WorkspaceOption = None,
    vision: VisionOption = "ViT-B-16",
    vision_pretrained: PretrainedOption = "openai",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    workers: Annotated[int | None, typer.Option(min=0, help="decoding processes; default from the CPU count")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="images per HDF5 shard")] = 1024,
    dtype: Annotated[str, typer.Option(help="float16 or float32 storage")] = "float16",
    precision: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16 (autocast on CUDA)")] = "auto",
    part: Annotated[str, typer.Option(help="I/N: build only shards k with k % N == I")] = "0/1",
):
    """Encode every usable image of a split into the feature cache: resumes an interrupted build,
    reuses a finished one, rebuilds one made from another encoder or image list."""
    if ctx.invoked_subcommand is not None:
        return
    from ituning.captioner import resolve_device
    from storage.feature_shards import EncodeSettings
    from storage.features import FeatureSettings, extract_features

    if dtype not in {"float16", "float32"} or precision not in {"auto", "float32", "bfloat16", "float16"}:
        _fail(ValueError(f"unknown --dtype {dtype!r} or --precision {precision!r}"))
    images, out_dir, spec = _split_images(workspace, dataset, split, vision, vision_pretrained)
    device = resolve_device(device)
    encode = EncodeSettings(batch_size, _default_workers(device) if workers is None else workers, device, dtype,
                            precision)
    shards = _part_shards(part, images, shard_size)
    _show_progress()
    try:
        report = extract_features(images, spec, out_dir, FeatureSettings(shard_size, encode), shards=shards)
    except (OSError, ValueError, RuntimeError) as error:
        _fail(error)
    typer.echo(f"{len(images)} usable images; shards encoded {report.encoded_shards}, reused {report.reused_shards}")
    for image_id, reason in sorted(report.unreadable.items()):
        typer.echo(f"unreadable: {image_id}: {reason}", err=True)
    typer.echo(f"{len(report.unreadable)} unreadable image(s) skipped")
    typer.echo(f"entry point: {report.entry}" if report.entry else
               f"{out_dir}: other shards are still missing; the run that finishes the last one writes the entry point")


@features_app.command()
def verify(
    dataset: DatasetOption = None,
    split: SplitOption = None,
    workspace: WorkspaceOption = None,
    vision: VisionOption = "ViT-B-16",
    vision_pretrained: PretrainedOption = "openai",
):
    """Check the cache against the catalog: rows, ids, NaN/Inf. Exits 1 on any problem."""
    from storage.features import ENTRY_NAME, verify_feature_cache

    images, out_dir, _ = _split_images(workspace, dataset, split, vision, vision_pretrained)
    report = verify_feature_cache(out_dir / ENTRY_NAME, [image_id for image_id, _ in images])
    typer.echo(f"{report.rows} rows for {report.expected} usable images; {len(report.unreadable)} unreadable")
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    if not report.ok:
        raise typer.Exit(1)
    typer.echo("ok")


def _split_images(workspace, dataset, split, vision, vision_pretrained):
    """The split's usable images as (image_id, path), its cache folder and the encoder spec."""
    if not dataset or not split:
        _fail(ValueError("--dataset and --split are required"))
    from ituning.backbones import BackboneSpec
    from storage.catalog import Catalog
    from storage.features import split_cache_dir
    from storage.workspace import workspace_root

    root = workspace_root(workspace)
    spec = BackboneSpec(vision, None if vision_pretrained.lower() in {"", "none"} else vision_pretrained)
    usable = Catalog(root / "catalog.duckdb", read_only=True).usable_images(dataset, split)
    images = [(image.image_id, image.path if image.path.is_absolute() else root / image.path) for image in usable]
    return images, split_cache_dir(root, dataset, split, spec), spec


def _part_shards(part: str, images: list, shard_size: int) -> list[int]:
    from storage.feature_shards import ShardPlan

    try:
        index, count = (int(number) for number in part.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        _fail(ValueError(f"--part must be I/N with 0 <= I < N, not {part!r}"))
    return [shard for shard in range(ShardPlan(tuple(images), shard_size).count) if shard % count == index]


def _show_progress() -> None:
    """Shard-by-shard progress of storage/ on stderr (open_clip's own INFO lines stay quiet)."""
    logger = logging.getLogger("storage")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _default_workers(device: str) -> int:
    cores = os.cpu_count() or 1
    return min(16, cores) if device.startswith("cuda") else max(1, cores - 1)


def _fail(error: Exception):
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)

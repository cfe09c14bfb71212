"""`ituning features`: frozen vision tokens of a split, cached in HDF5 (see pipeline/features.py).

    ituning features --dataset coco --split train                 # encode, resume or reuse
    ituning features --dataset coco --split train --part 1/4 --device cuda:1   # the second of four workers (0/4 to 3/4)
    ituning features verify --dataset coco --split train
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import typer

from cli.errors import fail
from storage.datasets import dataset_names

features_app = typer.Typer(help="Frozen vision tokens of a split, cached in HDF5 shards.",
                           invoke_without_command=True, pretty_exceptions_enable=False)

DatasetOption = Annotated[Literal[dataset_names()] | None, typer.Option(help="the dataset the split is of")]
SplitOption = Annotated[str | None, typer.Option(help="train, val, test or pretrain")]
WorkspaceOption = Annotated[Path | None, typer.Option(help="default ./workspace or $ITUNING_WORKSPACE")]
VisionOption = Annotated[str, typer.Option(help="open_clip model name or local-dir:PATH")]
PretrainedOption = Annotated[str, typer.Option(help="open_clip pretrained tag or weights file; 'none' for random")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
DtypeOption = Annotated[str, typer.Option(help="float16 or float32 storage")]
PrecisionOption = Annotated[str, typer.Option(help="auto, float32, bfloat16, float16 (autocast on CUDA)")]


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` (from 0): the shards k with k % count == index."""

    index: int
    count: int

    def shards(self, total: int) -> list[int]:
        return [shard for shard in range(total) if shard % self.count == self.index]


def parse_part(value: str | Part) -> Part:
    if isinstance(value, Part):
        return value
    index, _, count = str(value).partition("/")
    if not (index.isdecimal() and count.isdecimal() and 0 <= int(index) < int(count)):
        raise typer.BadParameter(f"{value!r} is not I/N with 0 <= I < N")
    return Part(int(index), int(count))


@features_app.callback()
def features(
    ctx: typer.Context,
    dataset: DatasetOption = None,
    split: SplitOption = None,
    workspace: WorkspaceOption = None,
    vision: VisionOption = "ViT-B-16",
    vision_pretrained: PretrainedOption = "openai",
    device: DeviceOption = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    workers: Annotated[int | None, typer.Option(min=0, help="decoding processes; default from the CPU count")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="images per HDF5 shard")] = 1024,
    dtype: DtypeOption = "float16",
    precision: PrecisionOption = "auto",
    decode_on_device: Annotated[str, typer.Option(
        help="JPEGs decoded by nvJPEG on the GPU: auto (where CUDA has it), never, always")] = "auto",
    part: Annotated[Part, typer.Option(parser=parse_part, metavar="I/N",
                                       help="build part I of N (from 0): the shards k with k % N == I")] = "0/1",
):
    """Encode every usable image of a split into the feature cache of the device's precision:
    resumes an interrupted build, reuses a finished one, rebuilds one made from another encoder or
    image list. Caches of other precisions are kept."""
    if ctx.invoked_subcommand is not None:
        return
    from storage.feature_shards import ShardPlan
    from pipeline.features import FeatureSettings, encode_features, split_cache_dir

    encode = _encode_settings(device, dtype, precision, batch_size, workers, decode_on_device)
    images, root, spec = _split_images(workspace, dataset, split, vision, vision_pretrained)
    out_dir = split_cache_dir(root, dataset, split, spec, encode)
    shards = part.shards(ShardPlan(tuple(images), shard_size).count)
    _show_progress()
    try:
        report = encode_features(images, spec, out_dir, FeatureSettings(shard_size, encode), shards=shards,
                                 workspace=root)
    except (OSError, ValueError, RuntimeError) as error:
        fail(error)
    for name, reason in sorted(report.damaged.items()):
        typer.echo(f"damaged: {name}: {reason}", err=True)
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
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float16",
    precision: PrecisionOption = "auto",
):
    """Check the cache that training and evaluation on this device read (the one of its precision,
    else another finished one) against the catalog and its checksums: every shard intact, rows, ids,
    NaN/Inf. One line per problem; exits 1 on any."""
    from pipeline.features import find_feature_entry
    from storage.feature_cache import rebuild_command
    from storage.feature_checks import verify_feature_cache

    images, root, spec = _split_images(workspace, dataset, split, vision, vision_pretrained)
    entry = find_feature_entry(root, dataset, split, spec, _encode_settings(device, dtype, precision))
    typer.echo(f"cache: {entry.parent}")
    report = verify_feature_cache(entry, [image_id for image_id, _ in images])
    typer.echo(f"{report.rows} rows for {report.expected} usable images; {len(report.unreadable)} unreadable")
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    for problem in report.problems:
        typer.echo(f"problem: {problem}", err=True)
    if not report.ok:
        typer.echo(f"to encode damaged or missing shards again: {rebuild_command(entry)} "
                   f"(with the options this cache was built with)", err=True)
        raise typer.Exit(1)
    typer.echo("ok")


def _split_images(workspace, dataset, split, vision, vision_pretrained):
    """The split's usable images as (image_id, path), the workspace folder and the encoder spec."""
    if not dataset or not split:
        fail(ValueError("--dataset and --split are required"))
    import duckdb

    from ituning.backbones import BackboneSpec
    from storage.catalog import Catalog
    from storage.workspace import workspace_root

    root = workspace_root(workspace)
    spec = BackboneSpec(vision, None if vision_pretrained.lower() in {"", "none"} else vision_pretrained)
    try:
        with Catalog(root / "catalog.duckdb", read_only=True) as catalog:
            images = catalog.image_paths(dataset, split)
    except (OSError, duckdb.Error) as error:  # no catalog yet, or a catalog build holds the file
        fail(error)
    return images, root, spec


def _encode_settings(device: str, dtype: str, precision: str, batch_size: int = 256, workers: int | None = None,
                     decode_on_device: str = "auto"):
    from ituning.captioner import resolve_device
    from ituning.device_jpeg import DECODE_ON_DEVICE
    from ituning.encoding import OUTPUT_DTYPES, EncodeSettings
    from ituning.precision import PRECISIONS

    if dtype not in OUTPUT_DTYPES or precision not in PRECISIONS:
        fail(ValueError(f"unknown --dtype {dtype!r} or --precision {precision!r}"))
    if decode_on_device not in DECODE_ON_DEVICE:
        fail(ValueError(f"unknown --decode-on-device {decode_on_device!r}: expected {', '.join(DECODE_ON_DEVICE)}"))
    device = resolve_device(device)
    return EncodeSettings(batch_size, _default_workers(device) if workers is None else workers, device, dtype,
                          precision, decode_on_device=decode_on_device)


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

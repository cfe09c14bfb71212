"""Building the catalog from a workspace's downloaded and unpacked files, one build at a time."""

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from storage.catalog import Catalog
from storage.catalog_lock import BUSY_WAIT_S, build_lock_held
from storage.datasets import AnnotationFiles, MissingInput, dataset_names, get_dataset
from storage.downloads import LEDGER, Ledger
from storage.sources import SourceRecords, resolve_image_paths
from storage.workspace import catalog_path, data_dir, downloads_dir

BUILD_ORDER = dataset_names()  # each dataset after those it needs (vg after coco)


ImageCheck = tuple[str, str | None, int | None, int | None]  # status, reason, width, height
ImageInspector = Callable[[list[Path], int], list[ImageCheck]]  # (files, worker processes) -> one check each


@dataclass(frozen=True)
class BuildSummary:
    dataset: str
    images: int
    usable: int
    captions: int
    excluded: int
    by_split: dict[str, int]


@contextmanager
def open_for_build(root: Path, wait: float = BUSY_WAIT_S):
    """The workspace's catalog opened for writing, one build at a time: BuildRunning when another
    build still holds it after `wait` seconds (see storage/catalog_lock.py)."""
    path = catalog_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock_held(path, wait), Catalog(path) as catalog:
        yield catalog


def find_input(root: Path, dataset: str, pattern: str) -> Path:
    """The annotation file matching `pattern` under data/<dataset>/ or downloads/<dataset>/."""
    for folder in (data_dir(root, dataset), downloads_dir(root, dataset)):
        found = sorted(folder.rglob(pattern)) if folder.is_dir() else []
        found = [path for path in found if not path.name.endswith(".part")]
        if found:
            return found[0]
    raise MissingInput(f"{dataset}: no {pattern} in {data_dir(root, dataset)} or {downloads_dir(root, dataset)}; "
                       f"run `ituning download {dataset}` first")


def read_sources(root: Path, dataset: str, catalog: Catalog) -> SourceRecords:
    """The dataset's published annotation files, read by its registry module."""
    def catalogued(other: str, splits: tuple[str, ...]) -> dict[str, str]:
        marks = ", ".join("?" * len(splits))
        _, rows = catalog.query(f"SELECT image_id, split FROM images WHERE dataset = ? AND split IN ({marks})",
                                [other, *splits])
        return dict(rows)

    return get_dataset(dataset).read(AnnotationFiles(lambda pattern: find_input(root, dataset, pattern), catalogued))


def in_catalog_terms(root: Path, paths: list[str]) -> list[str]:
    """Image paths as the catalog stores them: those inside the workspace relative to it (the
    catalog's own folder), so a copied or moved workspace keeps its catalog."""
    inside = f"{Path(root).absolute()}{os.sep}"
    return [path[len(inside):] if path.startswith(inside) else path for path in paths]


def build_dataset(root: Path, dataset: str, catalog: Catalog, inspect: ImageInspector | None,
                  workers: int = 2) -> BuildSummary:
    """Read a dataset's annotations, check its image files with `inspect` (None: catalogue them
    unchecked) and replace its rows in the catalog."""
    records = read_sources(root, dataset, catalog)
    base = data_dir(root, dataset).absolute()
    paths = resolve_image_paths(base, [row.path for row in records.images], locate=inspect is not None)
    to_check = [index for index, row in enumerate(records.images) if row.status is None]
    if inspect is not None:
        results = inspect([Path(paths[index]) for index in to_check], workers)
    else:
        results = [("unchecked", "file not opened when the catalog was built", None, None)] * len(to_check)
    for index, (status, reason, width, height) in zip(to_check, results):
        row = records.images[index]
        row.status, row.reason = status, reason
        row.width, row.height = width or row.width, height or row.height
    rows = records.images
    images = {"split": [r.split for r in rows], "image_id": [r.image_id for r in rows],
              "path": in_catalog_terms(root, paths), "width": [r.width for r in rows], "height": [r.height for r in rows],
              "domain": [r.domain for r in rows], "status": [r.status for r in rows], "reason": [r.reason for r in rows]}
    captions = dict(zip(("image_id", "split", "caption_id", "text"), map(list, zip(*records.captions)))) \
        if records.captions else {"image_id": [], "split": [], "caption_id": [], "text": []}
    synthetic = records.synthetic or _synthetic_download(root, dataset)
    catalog.replace_dataset(dataset, images, captions, records.excluded, synthetic)
    catalog.record_downloads(dataset, _verified_files(root, dataset))
    by_split: dict[str, int] = {}
    for row in rows:
        by_split[row.split] = by_split.get(row.split, 0) + (row.status == "ok")
    return BuildSummary(dataset, len(rows), sum(by_split.values()), len(records.captions), records.excluded, by_split)


def _synthetic_download(root: Path, dataset: str) -> bool:
    """Whether the dataset's files were downloaded from a manifest marked synthetic (a corpus used in
    place, data/<dataset> a link, is judged by its own files alone)."""
    from storage.acquire import recorded_manifest

    if data_dir(root, dataset).is_symlink():
        return False
    recorded = recorded_manifest(root, dataset)
    return recorded is not None and recorded.synthetic


def _verified_files(root: Path, dataset: str):
    ledgers = [downloads_dir(root, dataset) / LEDGER, *sorted(data_dir(root, dataset).glob(f"*/{LEDGER}"))]
    return [record for ledger in ledgers if ledger.is_file() for record in Ledger(ledger.parent).records.values()]

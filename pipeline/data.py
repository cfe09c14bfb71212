"""The data steps as plain functions: the demo corpus, downloads, a local corpus, the catalog and
the demo's stand-in backbones. Each takes the workspace folder and small values and returns a small
JSON-serialisable result, so an orchestrator can run, retry and cache it as a task.
"""

import hashlib
from dataclasses import asdict
from pathlib import Path

from pipeline.image_check import inspect_images
from pipeline.step_locks import folder_writer
from storage import catalog_build
from storage.catalog import Catalog
from storage.catalog_build import BUILD_ORDER, BuildSummary, open_for_build
from storage.workspace import catalog_path

STANDIN_SPLIT = ("coco", "train")  # what the demo's stand-in backbones learn from


def write_demo_corpus(workspace: Path, images: int = 600, seed: int = 0) -> dict[str, str]:
    """The synthetic corpus under workspace/synthetic; returns {dataset: manifest path}."""
    from storage.synthetic import write_corpus

    corpus = write_corpus(Path(workspace) / "synthetic", images, seed=seed)
    return {dataset: str(path) for dataset, path in corpus.manifests.items()}


def download(workspace: Path, dataset: str, manifest: str | None = None, images: str | None = None) -> dict:
    """Fetch, verify and unpack a dataset (its built-in manifest unless one is given)."""
    from storage.acquire import choose_manifest, download_dataset

    chosen = choose_manifest(Path(workspace), dataset, manifest and Path(manifest), images)
    report = download_dataset(chosen, Path(workspace))
    return asdict(report)


def use_local_corpus(workspace: Path, dataset: str, folder: str) -> dict:
    """A dataset already on disk in its published layout (e.g. a Karpathy-format dataset_coco.json
    with its images at <filepath>/<filename> beside it), used in place: data/<dataset> in the
    workspace becomes a link to it. Returns a download-style report with the corpus's digest (its
    top-level files), so that the catalog is rebuilt when the corpus changes."""
    from storage.workspace import data_dir

    source, link = Path(folder).expanduser().resolve(), data_dir(Path(workspace), dataset)
    if not source.is_dir():
        raise FileNotFoundError(f"{dataset}: corpus folder {folder} does not exist")
    if link.is_symlink() and link.resolve() != source:
        link.unlink()
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{dataset}: {link} already holds downloaded files; use another workspace for the "
                              f"corpus at {source}, or remove {link}")
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source, target_is_directory=True)
    return {"dataset": dataset, "fetched": [], "unpacked": [], "images": 0, "failures": [], "corpus": str(source),
            "digest": content_digest(source)}


def build_catalog(workspace: Path, datasets: list[str]) -> dict[str, dict]:
    """Catalog rows for each dataset, in the order the builds depend on; per-dataset summaries."""
    unknown = sorted(set(datasets) - set(BUILD_ORDER))
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; expected some of {list(BUILD_ORDER)}")
    with open_for_build(Path(workspace)) as catalog:
        return {dataset: asdict(build_dataset(Path(workspace), dataset, catalog))
                for dataset in BUILD_ORDER if dataset in datasets}


def build_dataset(root: Path, dataset: str, catalog: Catalog, check_images: bool = True,
                  workers: int = 2) -> BuildSummary:
    """A dataset's rows in the catalog, each image file checked by decoding it as training reads it
    (or catalogued unchecked)."""
    return catalog_build.build_dataset(root, dataset, catalog, inspect_images if check_images else None, workers)


def open_catalog(workspace: Path) -> Catalog:
    """The workspace's catalog, read-only (several stages may read it at once)."""
    path = catalog_path(Path(workspace))
    if not path.is_file():
        raise FileNotFoundError(f"no catalog at {path}: download the datasets and build it first "
                                f"(`ituning download coco`, `ituning catalog build`)")
    return Catalog(path, read_only=True)


def is_synthetic(workspace: Path, dataset: str) -> bool:
    """Whether the catalog's `dataset` is the synthetic corpus in its format, not the dataset itself."""
    with open_catalog(workspace) as catalog:
        return catalog.is_synthetic(dataset)


def catalog_fingerprint(workspace: Path, splits: list, captions: bool = True) -> str:
    """One digest of what the catalog holds now for these (dataset, split) pairs: the usable images
    (ids and paths) and, unless captions is False, their captions. "no catalog" before there is one."""
    if not catalog_path(Path(workspace)).is_file():
        return "no catalog"
    with open_catalog(workspace) as catalog:
        read = catalog.split_fingerprint if captions else catalog.image_list_fingerprint
        parts = [f"{dataset}/{split}:{read(dataset, split)}" for dataset, split in splits]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def content_digest(path: str | Path) -> str:
    """sha256 over a file, or over the files of a folder (names and contents): what a path holds now."""
    from storage.downloads import file_checksum

    path = Path(path)
    files = sorted(item for item in path.iterdir() if item.is_file()) if path.is_dir() else [path]
    parts = [f"{item.name}:{file_checksum(item)}" for item in files if item.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest() if parts else "missing"


def split_images(workspace: Path, dataset: str, split: str) -> list[tuple[str, Path]]:
    """The split's usable images as (image_id, absolute path), sorted by image id."""
    with open_catalog(workspace) as catalog:
        images = catalog.image_paths(dataset, split)
    if not images:
        raise ValueError(f"{dataset}/{split}: no usable images in the catalog; download and build it first")
    return images


def build_demo_backbones(workspace: Path, seed: int = 0, vision_steps: int = 300, language_steps: int = 300,
                         batch_size: int = 128, out_dir: Path | None = None) -> dict:
    """Stand-in backbones trained on the catalog's COCO train split (the synthetic corpus in a demo
    workspace), saved under out_dir (default workspace/backbones); returns their BackboneSpec as a dict."""
    from ituning.standins import StandinTraining, build_standins_from_images

    with open_catalog(workspace) as catalog:
        captions = catalog.captions(*STANDIN_SPLIT)
    images = [(path, captions[image_id]) for image_id, path in split_images(workspace, *STANDIN_SPLIT)
              if captions.get(image_id)]
    settings = StandinTraining(vision_steps=vision_steps, language_steps=language_steps, batch_size=batch_size,
                               seed=seed)
    out = Path(out_dir or Path(workspace) / "backbones")
    with folder_writer(out, "building stand-in backbones"):
        spec = build_standins_from_images(images, out, settings, progress=True)
    return spec.to_dict()

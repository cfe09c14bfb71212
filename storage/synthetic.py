"""A small offline corpus in exactly the raw formats of the registry's datasets (storage/datasets/).

Each dataset's module writes its own part with the helpers here (its `write_synthetic`); this
module runs them in build order and writes the manifests.

Images are rendered scenes (storage/scenes.py) with five true captions each, so a model trained on
the corpus can be scored meaningfully. The corpus also carries the defects real data has: in the
COCO train split one truncated JPEG, one text file named .jpg, one image listed but absent from the
zip, and usable oddities (a grayscale JPEG, a CMYK JPEG, a PNG named .jpg). Some VG images carry
coco_ids from the COCO Karpathy val/test splits, which the catalog must keep out of pre-training.
Manifests in manifests/<dataset>.json point at the files by URL (`base_url`) or by local path.
The corpus says what it is, so nothing made from it passes for the real datasets: its manifests are
`synthetic`, and so are its Karpathy and NoCaps files at the top level (storage/sources.py).
"""

import hashlib
import io
import json
import random
import zipfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from storage.datasets import all_datasets
from storage.manifests import ImageList, Manifest, RemoteFile, manifest_to_json
from storage.scenes import describe, random_scene, render_scene
from storage.sources import SYNTHETIC_MARK

# Usable defects keep status "ok" with a reason; the others make the image unusable.
COCO_DEFECTS = ("truncated", "not-an-image", "missing", "grayscale", "cmyk", "png-named-jpg")
UNUSABLE = {"truncated": "unreadable", "not-an-image": "unreadable", "missing": "missing"}


@dataclass
class SyntheticCorpus:
    root: Path
    manifests: dict[str, Path] = field(default_factory=dict)
    splits: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # dataset -> split -> image ids
    defects: dict[str, str] = field(default_factory=dict)  # COCO image id -> defect
    vg_held_out: list[str] = field(default_factory=list)  # VG ids whose coco_id is in COCO val/test


@dataclass(frozen=True)
class SyntheticPart:
    """What a dataset's synthetic writer made: its files, its images by split and, for a dataset
    published in the Karpathy format, the entries of its split file."""

    files: tuple[RemoteFile, ...]
    splits: dict[str, list[str]]  # split -> image ids
    karpathy: list[dict] | None = None  # the `images` of dataset_<name>.json
    image_lists: tuple[ImageList, ...] = ()


class SyntheticWriter:
    """Writes the corpus's files under one folder, rendering its scenes from one seeded generator."""

    def __init__(self, out: Path, base_url: str | None, seed: int, size: int, with_defects: bool = True):
        self.out, self.base_url, self.size, self.with_defects = out, base_url, size, with_defects
        self.rng = random.Random(seed)

    def url(self, relative: str) -> str:
        return f"{self.base_url.rstrip('/')}/{relative}" if self.base_url else str((self.out / relative).absolute())

    def scene(self, count: int = 5):
        scene = random_scene(self.rng)
        return render_scene(scene, self.size), describe(scene, self.rng, count)

    def write(self, relative: str, payload: bytes) -> RemoteFile:
        path = self.out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        return RemoteFile(path.name, self.url(relative), len(payload), hashlib.md5(payload).hexdigest())


def encode_image(image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, quality=90) if image_format == "JPEG" else image.save(buffer, image_format)
    return buffer.getvalue()


def zip_files(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def karpathy_entry(image_number: int, filename: str, split: str, captions: list[str], first_sentence: int,
                    **extra) -> dict:
    sentences = [{"raw": text, "tokens": text.split(), "imgid": image_number, "sentid": first_sentence + k}
                 for k, text in enumerate(captions)]
    return {**extra, "filename": filename, "imgid": image_number, "split": split,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences}


def split_of(position: int, count: int, shares: tuple[tuple[str, float], ...]) -> str:
    edge = 0.0
    for split, share in shares:
        edge += share
        if position < round(edge * count):
            return split
    return shares[-1][0]


def image_payload(image, defect: str | None) -> bytes | None:
    """The file bytes for an image with the given defect (None: a plain JPEG; "missing": no file)."""
    if defect == "missing":
        return None
    if defect == "truncated":
        payload = encode_image(image, "JPEG")
        return payload[: len(payload) // 2]
    if defect == "not-an-image":
        return b"this is not an image\n" * 20
    if defect == "png-named-jpg":
        return encode_image(image, "PNG")
    converted = {"grayscale": "L", "cmyk": "CMYK"}.get(defect, "RGB")
    return encode_image(image.convert(converted), "JPEG")


def write_flat_archive_part(writer: SyntheticWriter, count: int, archive: str, folder: str,
                            filenames: list[str], shares: tuple[tuple[str, float], ...]) -> SyntheticPart:
    """A dataset published as a Karpathy split file (entries without filepath or cocoid, ids the
    file-name stems) and one image archive holding a flat `folder` (Flickr30k, Flickr8k)."""
    members, entries, splits = {}, [], {}
    for position, filename in enumerate(filenames[:count]):
        split = split_of(position, count, shares)
        image, captions = writer.scene()
        members[f"{folder}/{filename}"] = image_payload(image, None)
        entries.append(karpathy_entry(position, filename, split, captions, 5 * position))
        splits.setdefault(split, []).append(Path(filename).stem)
    return SyntheticPart((writer.write(archive, zip_files(members)),), splits, entries)


def write_corpus(out: Path, images: int = 40, base_url: str | None = None, seed: int = 0, size: int = 64,
                 with_defects: bool = True, datasets: Collection[str] | None = None) -> SyntheticCorpus:
    """Write every registry dataset, or those named in `datasets` (`images` images each; COCO needs
    at least 15), each by its own module's writer in build order, and their manifests. The Karpathy
    split files of all datasets that have one go into one caption_datasets.zip, as in the published
    archive."""
    if images < 15:
        raise ValueError("the synthetic corpus needs at least 15 images per dataset")
    unknown = set(datasets or ()) - {dataset.name for dataset in all_datasets()}
    if unknown:
        raise ValueError(f"no dataset named {', '.join(sorted(unknown))} in the registry")
    out = Path(out)
    writer, corpus = SyntheticWriter(out, base_url, seed, size, with_defects), SyntheticCorpus(out)
    parts = {}
    for dataset in all_datasets():
        if datasets is not None and dataset.name not in datasets:
            continue
        parts[dataset.name] = dataset.write_synthetic(writer, images, corpus)
        corpus.splits[dataset.name] = parts[dataset.name].splits
    karpathy = writer.write("karpathy/caption_datasets.zip", zip_files({
        f"dataset_{name}.json": json.dumps({"dataset": name, "images": part.karpathy, SYNTHETIC_MARK: True}).encode()
        for name, part in parts.items() if part.karpathy is not None}))
    for name, part in parts.items():
        files = part.files + ((karpathy,) if part.karpathy is not None else ())
        corpus.manifests[name] = out / "manifests" / f"{name}.json"
        corpus.manifests[name].parent.mkdir(parents=True, exist_ok=True)
        corpus.manifests[name].write_text(json.dumps(manifest_to_json(
            Manifest(name, files, part.image_lists, synthetic=True)), indent=1))
    return corpus


def unpack_karpathy_coco(corpus: SyntheticCorpus, out: Path | None = None) -> Path:
    """The corpus's COCO images and dataset_coco.json unpacked into one folder (default
    root/karpathy-coco): a corpus in the Karpathy format whose folder is the image root, for the
    readers that take one directly. Returns the JSON's path."""
    from storage.extract import unpack

    out = Path(out or corpus.root / "karpathy-coco")
    for archive in (corpus.root / "karpathy" / "caption_datasets.zip", corpus.root / "coco" / "train2014.zip",
                    corpus.root / "coco" / "val2014.zip"):
        unpack(archive, out)
    return out / "dataset_coco.json"

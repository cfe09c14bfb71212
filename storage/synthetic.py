"""A small offline corpus in exactly the raw formats of COCO/Karpathy, Flickr30k, Visual Genome and NoCaps.

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
from dataclasses import dataclass, field
from pathlib import Path

from storage.manifests import ImageList, Manifest, RemoteFile, manifest_to_json
from storage.scenes import describe, random_scene, render_scene
from storage.sources import NOCAPS_DOMAINS, SYNTHETIC_MARK

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


class _Writer:
    def __init__(self, out: Path, base_url: str | None, seed: int, size: int):
        self.out, self.base_url, self.size = out, base_url, size
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


def _encode(image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, quality=90) if image_format == "JPEG" else image.save(buffer, image_format)
    return buffer.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def _karpathy_entry(image_number: int, filename: str, split: str, captions: list[str], first_sentence: int,
                    **extra) -> dict:
    sentences = [{"raw": text, "tokens": text.split(), "imgid": image_number, "sentid": first_sentence + k}
                 for k, text in enumerate(captions)]
    return {**extra, "filename": filename, "imgid": image_number, "split": split,
            "sentids": [s["sentid"] for s in sentences], "sentences": sentences}


def _split_of(position: int, count: int, shares: tuple[tuple[str, float], ...]) -> str:
    edge = 0.0
    for split, share in shares:
        edge += share
        if position < round(edge * count):
            return split
    return shares[-1][0]


def _payload(image, defect: str | None) -> bytes | None:
    """The file bytes for an image with the given defect (None: a plain JPEG; "missing": no file)."""
    if defect == "missing":
        return None
    if defect == "truncated":
        payload = _encode(image, "JPEG")
        return payload[: len(payload) // 2]
    if defect == "not-an-image":
        return b"this is not an image\n" * 20
    if defect == "png-named-jpg":
        return _encode(image, "PNG")
    converted = {"grayscale": "L", "cmyk": "CMYK"}.get(defect, "RGB")
    return _encode(image.convert(converted), "JPEG")


def _write_coco(writer: _Writer, count: int, with_defects: bool, corpus: SyntheticCorpus):
    """COCO image zips and caption annotations; returns (files, Karpathy JSON, cocoid -> split)."""
    shares = (("train", 0.4), ("restval", 0.2), ("val", 0.2), ("test", 0.2))
    members = {"train2014": {}, "val2014": {}}
    annotations = {folder: {"images": [], "annotations": []} for folder in members}
    entries, splits = [], {}
    for position in range(count):
        cocoid, split = 100_000 + 37 * position, _split_of(position, count, shares)
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        image, captions = writer.scene()
        defect = COCO_DEFECTS[position] if with_defects and position < len(COCO_DEFECTS) else None
        if defect:
            corpus.defects[str(cocoid)] = defect
        payload = _payload(image, defect)
        if payload is not None:
            members[folder][f"{folder}/{filename}"] = payload
        entries.append(_karpathy_entry(position, filename, split, captions, 5 * position,
                                       filepath=folder, cocoid=cocoid))
        annotations[folder]["images"].append({"id": cocoid, "file_name": filename, "width": writer.size,
                                              "height": writer.size})
        annotations[folder]["annotations"] += [{"id": 5 * position + k, "image_id": cocoid, "caption": text}
                                               for k, text in enumerate(captions)]
        splits[str(cocoid)] = "train" if split == "restval" else split
    annotation_zip = _zip({f"annotations/captions_{folder}.json": json.dumps(content).encode()
                           for folder, content in annotations.items()})
    files = [writer.write(f"coco/{folder}.zip", _zip(content)) for folder, content in members.items()]
    files.append(writer.write("coco/annotations_trainval2014.zip", annotation_zip))
    return files, {"dataset": "coco", "images": entries, SYNTHETIC_MARK: True}, splits


def _write_flickr30k(writer: _Writer, count: int):
    """The user-supplied image archive; returns (archive file, Karpathy JSON, image id -> split)."""
    shares = (("train", 0.7), ("val", 0.15), ("test", 0.15))
    members, entries, splits = {}, [], {}
    for position in range(count):
        filename, split = f"{1_000_000 + position}.jpg", _split_of(position, count, shares)
        image, captions = writer.scene()
        members[f"flickr30k-images/{filename}"] = _payload(image, None)
        entries.append(_karpathy_entry(position, filename, split, captions, 5 * position))
        splits[filename[:-4]] = split
    archive = writer.write("flickr30k/flickr30k-images.zip", _zip(members))
    return archive, {"dataset": "flickr30k", "images": entries, SYNTHETIC_MARK: True}, splits


def _write_visual_genome(writer: _Writer, count: int, coco_splits: dict[str, str], corpus: SyntheticCorpus):
    """VG images (half in images.zip, half in images2.zip), image_data and region_descriptions."""
    by_split = {split: [c for c, s in coco_splits.items() if s == split] for split in ("train", "val", "test")}
    linked = by_split["test"][:3] + by_split["val"][:1] + by_split["train"][:2]  # coco_ids carried by VG images
    members, image_data, regions = {"VG_100K": {}, "VG_100K_2": {}}, [], []
    for position in range(count):
        image_id, folder = position + 1, "VG_100K" if position < count // 2 else "VG_100K_2"
        coco_id = int(linked[position]) if position < len(linked) else None
        if coco_id is not None and coco_splits[str(coco_id)] in ("val", "test"):
            corpus.vg_held_out.append(str(image_id))
        image, phrases = writer.scene(count=3)
        members[folder][f"{folder}/{image_id}.jpg"] = _payload(image, None)
        image_data.append({"image_id": image_id, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg",
                           "width": writer.size, "height": writer.size, "coco_id": coco_id, "flickr_id": None})
        regions.append({"id": image_id, "regions": [
            {"region_id": 10 * image_id + k, "image_id": image_id, "phrase": phrase, "x": 0, "y": 0,
             "width": writer.size, "height": writer.size} for k, phrase in enumerate(phrases)]})
    files = [writer.write("vg/images.zip", _zip(members["VG_100K"])),
             writer.write("vg/images2.zip", _zip(members["VG_100K_2"])),
             writer.write("vg/image_data.json.zip", _zip({"image_data.json": json.dumps(image_data).encode()})),
             writer.write("vg/region_descriptions.json.zip",
                          _zip({"region_descriptions.json": json.dumps(regions).encode()}))]
    return files, {str(entry["image_id"]): "pretrain" for entry in image_data}


def _write_nocaps(writer: _Writer, count: int):
    """Image info for val and test as NoCaps ships it (one URL per image, no domain) and the val
    captions in COCO layout (10 per image, some with a trailing space) whose images name their
    domain, the only place a NoCaps file does."""
    files, splits = [], {}
    header = {SYNTHETIC_MARK: True, "licenses": [{"url": "https://creativecommons.org/licenses/by/2.0/", "id": 0,
                                                  "name": "Attribution 2.0 Generic (CC BY 2.0)"}]}
    for split, first_id in (("val", 0), ("test", count)):  # test ids follow val's, as NoCaps numbers them
        images, annotations = [], []
        for image_id in range(first_id, first_id + count):
            image, captions = writer.scene(count=10)
            file_name = f"{writer.rng.getrandbits(64):016x}.jpg"
            writer.write(f"nocaps/{split}/{file_name}", _payload(image, None))
            images.append({"id": image_id, "open_images_id": file_name[:-4], "file_name": file_name,
                           "coco_url": writer.url(f"nocaps/{split}/{file_name}"), "height": writer.size,
                           "width": writer.size, "license": 0, "date_captured": "2018-11-06 11:04:33"})
            annotations += [{"image_id": image_id, "id": 10 * image_id + k, "caption": text + " " * (k == 0)}
                            for k, text in enumerate(captions)]
            splits.setdefault(split, []).append(str(image_id))
        info = {**header, "info": {"description": f"nocaps {split} dataset", "version": "0.2"}, "images": images}
        files.append(writer.write(f"nocaps/nocaps_{split}_image_info.json", json.dumps(info).encode()))
        if split == "val":
            with_domains = [{**entry, "domain": NOCAPS_DOMAINS[entry["id"] % 3]} for entry in images]
            captions_file = {**info, "images": with_domains, "annotations": annotations}
            files.append(writer.write("nocaps/nocaps_val_4500_captions.json", json.dumps(captions_file).encode()))
    return files, splits


def write_corpus(out: Path, images: int = 40, base_url: str | None = None, seed: int = 0, size: int = 64,
                 with_defects: bool = True) -> SyntheticCorpus:
    """Write the four datasets (`images` images each; COCO needs at least 15) and their manifests."""
    if images < 15:
        raise ValueError("the synthetic corpus needs at least 15 images per dataset")
    out = Path(out)
    writer, corpus = _Writer(out, base_url, seed, size), SyntheticCorpus(out)
    coco_files, coco_json, coco_splits = _write_coco(writer, images, with_defects, corpus)
    flickr_archive, flickr_json, flickr_splits = _write_flickr30k(writer, images)
    vg_files, vg_splits = _write_visual_genome(writer, images, coco_splits, corpus)
    nocaps_files, nocaps_splits = _write_nocaps(writer, images)
    karpathy = writer.write("karpathy/caption_datasets.zip", _zip({
        "dataset_coco.json": json.dumps(coco_json).encode(), "dataset_flickr30k.json": json.dumps(flickr_json).encode()}))
    manifests = {
        "coco": Manifest("coco", tuple(coco_files) + (karpathy,), synthetic=True),
        "flickr30k": Manifest("flickr30k", (karpathy, flickr_archive), synthetic=True),
        "vg": Manifest("vg", tuple(vg_files), synthetic=True),
        "nocaps": Manifest("nocaps", tuple(nocaps_files), (ImageList("nocaps_val_image_info.json", "val"),
                                                           ImageList("nocaps_test_image_info.json", "test")), True),
    }
    for name, manifest in manifests.items():
        corpus.manifests[name] = out / "manifests" / f"{name}.json"
        corpus.manifests[name].parent.mkdir(parents=True, exist_ok=True)
        corpus.manifests[name].write_text(json.dumps(manifest_to_json(manifest), indent=1))
    for name, splits in (("coco", coco_splits), ("flickr30k", flickr_splits), ("vg", vg_splits)):
        corpus.splits[name] = {}
        for image_id, split in splits.items():
            corpus.splits[name].setdefault(split, []).append(image_id)
    corpus.splits["nocaps"] = nocaps_splits
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

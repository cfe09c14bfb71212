"""Readers of the raw annotation formats: Karpathy splits, Visual Genome and NoCaps.

Each returns image rows (with a path relative to the dataset's data folder) and caption rows;
a file that lacks a needed field raises MalformedInput naming the file and the field. A file of the
synthetic corpus (storage/synthetic.py) says so where its format has a top-level object (Karpathy,
NoCaps): `"synthetic": true`, which the records carry on.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from storage.jsonfields import INT32, INT64, MalformedInput, inside_path, integer, load_json, one_of, required

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
SYNTHETIC_MARK = "synthetic"  # top-level key of an annotation file made in a dataset's format, not the dataset


def marked_synthetic(raw) -> bool:
    """Whether an annotation file's top-level object carries the synthetic corpus's mark."""
    return isinstance(raw, dict) and raw.get(SYNTHETIC_MARK) is True


def unknown_domains(domains: dict) -> list[str]:
    """The domain names, among {image_id: domain or None}, that NoCaps does not have, sorted."""
    return sorted({str(domain) for domain in domains.values() if domain is not None} - set(NOCAPS_DOMAINS))


@dataclass
class ImageRow:
    image_id: str
    split: str
    path: str  # relative to data/<dataset>/
    width: int | None = None
    height: int | None = None
    domain: str | None = None
    status: str | None = None  # None until the file is checked
    reason: str | None = None


@dataclass
class SourceRecords:
    images: list[ImageRow] = field(default_factory=list)
    captions: list[tuple[str, str, int, str]] = field(default_factory=list)  # image_id, split, caption_id, text
    excluded: int = 0
    synthetic: bool = False  # the files say they are the synthetic corpus, not the dataset
    _seen: set = field(default_factory=set, repr=False)

    def add_image(self, row: ImageRow, source: Path, where: str) -> None:
        if (row.split, row.image_id) in self._seen:
            raise MalformedInput(f"{source}: {where} repeats image id {row.image_id} in split {row.split}")
        self._seen.add((row.split, row.image_id))
        self.images.append(row)


@dataclass(frozen=True)
class KarpathyLayout:
    """Where the images of a Karpathy split file lie and what identifies them. COCO's entries name
    their folder (`filepath`) and carry a `cocoid`; other datasets' (Flickr30k, Flickr8k) give only
    a `filename`, whose stem is the id, in the folder their image archive unpacks to."""

    image_folder: str | None  # None: COCO's <filepath>/<filename>, by cocoid

    def locate(self, entry: dict, filename: str, path: Path, where: str) -> tuple[str, str]:
        """(image id, path relative to the dataset's data folder) of one entry."""
        if self.image_folder is None:
            image_id = str(required(entry, "cocoid", int, path, where))
            filepath = inside_path(required(entry, "filepath", str, path, where), path, f"{where}.filepath")
            return image_id, f"{filepath}/{filename}"
        return PurePosixPath(filename).stem, str(PurePosixPath(self.image_folder, filename))


COCO_LAYOUT = KarpathyLayout(None)


def read_karpathy(path: Path, layout: KarpathyLayout | None = None) -> SourceRecords:
    """A Karpathy split file (dataset_coco.json, dataset_flickr8k.json ...): train (+ restval), val
    and test, images where `layout` puts them (resolve_image_paths also finds them elsewhere under
    the data folder). Without a layout, a file whose first image has a cocoid is read as COCO's,
    others with their images directly in the data folder."""
    raw = _as_object(load_json(path), path)
    records = SourceRecords(synthetic=marked_synthetic(raw))
    entries = required(raw, "images", list, path)
    if layout is None:
        coco = entries and isinstance(entries[0], dict) and "cocoid" in entries[0]
        layout = COCO_LAYOUT if coco else KarpathyLayout("")
    for index, entry in enumerate(entries):
        where = f"images[{index}]"
        split = one_of(entry, "split", KARPATHY_SPLITS, path, where)
        filename = inside_path(required(entry, "filename", str, path, where), path, f"{where}.filename")
        image_id, relative = layout.locate(entry, filename, path, where)
        split = KARPATHY_SPLITS[split]
        records.add_image(ImageRow(image_id, split, relative), path, where)
        for number, sentence in enumerate(required(entry, "sentences", list, path, where)):
            at = f"{where}.sentences[{number}]"
            text = required(sentence, "raw", str, path, at)
            sentid = sentence.get("sentid", number)
            if type(sentid) is not int or not INT64[0] <= sentid <= INT64[1]:  # checked inline: 600k captions
                sentid = integer(sentence, "sentid", path, at, optional=True)
            records.captions.append((image_id, split, number if sentid is None else sentid, text.strip()))
    return records


def read_visual_genome(image_data: Path, regions: Path, held_out: dict[str, str]) -> SourceRecords:
    """VG images for pre-training; those whose coco_id is in `held_out` (coco_id -> split) are excluded."""
    records = SourceRecords()
    kept = set()
    for index, entry in enumerate(_as_list(load_json(image_data), image_data)):
        where = f"[{index}]"
        image_id = str(required(entry, "image_id", int, image_data, where))
        url = required(entry, "url", str, image_data, where)
        folder_and_name = [part for part in PurePosixPath(urlparse(url).path).parts if part != "/"][-2:]
        row = ImageRow(image_id, "pretrain", inside_path("/".join(folder_and_name), image_data, f"{where}.url"),
                       *_size(entry, image_data, where))
        coco_id = integer(entry, "coco_id", image_data, where, optional=True)
        if coco_id is not None and str(coco_id) in held_out:
            row.status, row.reason = "excluded", f"coco_id {coco_id} is in COCO Karpathy {held_out[str(coco_id)]}"
            records.excluded += 1
        else:
            kept.add(image_id)
        records.add_image(row, image_data, where)
    for index, entry in enumerate(_as_list(load_json(regions), regions)):
        image_id = str(required(entry, "id", int, regions, f"[{index}]"))
        if image_id not in kept:
            continue
        for number, region in enumerate(required(entry, "regions", list, regions, f"[{index}]")):
            where = f"[{index}].regions[{number}]"
            phrase = required(region, "phrase", str, regions, where)
            records.captions.append((image_id, "pretrain", integer(region, "region_id", regions, where),
                                     phrase.strip()))
    return records


def read_nocaps(info: Path, split: str, captions: Path | None = None) -> SourceRecords:
    """NoCaps image info and, for val, the reference captions (COCO layout).

    The image-info files carry no domain: test domains are private to the evaluation server, and
    val domains come, where they come at all, with the images of the val captions file. A domain
    is read from either file when present and checked; images without one keep domain None."""
    caption_data = load_json(captions) if captions is not None else None
    domains = _nocaps_domains(caption_data, captions) if caption_data is not None else {}
    info_data = load_json(info)
    records = SourceRecords(synthetic=marked_synthetic(info_data))
    for index, entry in enumerate(required(info_data, "images", list, info)):
        where = f"images[{index}]"
        image_id = str(required(entry, "id", int, info, where))
        domain = one_of(entry, "domain", NOCAPS_DOMAINS, info, where) if "domain" in entry else None
        if domain and domains.get(image_id, domain) != domain:
            raise MalformedInput(f"{info}: {where} (image {image_id}) is {domain}, but {captions} says "
                                 f"{domains[image_id]}")
        file_name = inside_path(required(entry, "file_name", str, info, where), info, f"{where}.file_name")
        records.add_image(ImageRow(image_id, split, f"{split}/{file_name}", *_size(entry, info, where),
                                   domain or domains.get(image_id)), info, where)
    if caption_data is not None:
        for index, entry in enumerate(required(caption_data, "annotations", list, captions)):
            where = f"annotations[{index}]"
            records.captions.append((str(required(entry, "image_id", int, captions, where)), split,
                                     integer(entry, "id", captions, where),
                                     required(entry, "caption", str, captions, where).strip()))
    return records


def _nocaps_domains(caption_data, captions: Path) -> dict[str, str]:
    """image id -> domain for the images of a NoCaps captions file that name their domain."""
    domains = {}
    for index, entry in enumerate(caption_data.get("images", []) if isinstance(caption_data, dict) else []):
        if isinstance(entry, dict) and "domain" in entry:
            where = f"images[{index}]"
            domains[str(required(entry, "id", int, captions, where))] = one_of(entry, "domain", NOCAPS_DOMAINS,
                                                                              captions, where)
    return domains


def resolve_image_paths(base: Path, relative: list[str], locate: bool = True) -> list[str]:
    """base/relative where that file exists; otherwise the file of that name anywhere under base
    (an archive unpacked with or without its top folder), else base/relative still."""
    prefix = f"{base}{os.sep}"
    paths = [prefix + item for item in relative]  # plain strings: Path objects cost seconds at COCO size
    if not locate:
        return paths
    index: dict[str, str] | None = None
    for position, path in enumerate(paths):
        if os.path.isfile(path):
            continue
        if index is None:
            index = {name: os.path.join(folder, name) for folder, _, names in os.walk(base) for name in names}
        paths[position] = index.get(os.path.basename(path), path)
    return paths


def _size(entry, source: Path, where: str) -> tuple[int | None, int | None]:
    """An image's width and height where its entry gives them (the catalog keeps them as INTEGER)."""
    return tuple(integer(entry, key, source, where, (0, INT32[1]), optional=True) for key in ("width", "height"))


def _as_object(raw, path: Path) -> dict:
    if not isinstance(raw, dict):
        raise MalformedInput(f"{path}: expected a JSON object at the top level, found {type(raw).__name__}")
    return raw


def _as_list(raw, path: Path) -> list:
    if not isinstance(raw, list):
        raise MalformedInput(f"{path}: expected a JSON list at the top level, found {type(raw).__name__}")
    return raw

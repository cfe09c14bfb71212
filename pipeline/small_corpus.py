"""Caption corpora in the Karpathy split format (dataset_coco.json, dataset_flickr8k.json ...), read
directly rather than through the catalog: the small-corpus path of `ituning train --karpathy-json`
and `ituning standins`."""

from pathlib import Path

from ituning.backbones import BackboneSpec
from ituning.karpathy import KarpathyImage
from ituning.standins import StandinTraining, build_standins_from_images
from storage.sources import read_karpathy, resolve_image_paths


def read_karpathy_split(json_path: str | Path, image_root: str | Path, split: str) -> list[KarpathyImage]:
    """The images of one split (train includes restval), sorted by image id: COCO-style entries
    (with cocoid) by str(cocoid) at root/filepath/filename, others (Flickr30k, Flickr8k) by file-name
    stem at root/filename. A file not there is looked for by name anywhere under root (e.g. in
    the folder its image archive unpacks to). The file is read by the catalog's own
    reader and paths resolved alike, so both agree on ids, paths and splits; a file that is not in
    that format raises storage.jsonfields.MalformedInput (a ValueError) naming the file and field."""
    records = read_karpathy(Path(json_path))
    captions: dict[str, list[str]] = {}
    for image_id, caption_split, _, text in records.captions:
        if caption_split == split:
            captions.setdefault(image_id, []).append(text)
    rows = [row for row in records.images if row.split == split]
    paths = resolve_image_paths(Path(image_root), [row.path for row in rows])
    images = [KarpathyImage(row.image_id, Path(path), captions.get(row.image_id, [])) for row, path in zip(rows, paths)]
    if not images:
        raise ValueError(f"{json_path}: no images in split '{split}'")
    return sorted(images, key=lambda image: image.image_id)


def build_trained_standins(karpathy_json: str | Path, image_root: str | Path, directory: str | Path,
                           settings: StandinTraining = StandinTraining(), progress: bool = True) -> BackboneSpec:
    """Stand-ins learned from the training split of a corpus in the Karpathy format."""
    images = read_karpathy_split(karpathy_json, image_root, "train")
    return build_standins_from_images([(image.path, image.captions) for image in images], directory, settings,
                                      progress)

"""Caption corpora in the Karpathy split format (dataset_coco.json, dataset_flickr30k.json), read
directly: the images of a split with their captions, and their visual tokens computed in memory.

This is the small-corpus path (the synthetic corpus, a user's own data); the full datasets go
through the catalog and the HDF5 feature cache instead.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ituning.backbones import BackboneSpec, load_vision_encoder
from ituning.images import open_rgb


@dataclass(frozen=True)
class KarpathyImage:
    image_id: str
    path: Path
    captions: list[str]


def read_karpathy_split(json_path: str | Path, image_root: str | Path, split: str) -> list[KarpathyImage]:
    """The images of one split (train includes restval), sorted by image id: COCO-style entries
    (with cocoid) by str(cocoid) at root/filepath/filename, others (Flickr30k) by file-name stem at
    root/flickr30k-images/filename. A file not there is looked for by name anywhere under root
    (e.g. Flickr30k images unpacked without their folder). The file is read by the catalog's own
    reader and paths resolved alike, so both agree on ids, paths and splits; a file that is not in
    that format raises storage.jsonfields.MalformedInput (a ValueError) naming the file and field."""
    from storage.sources import read_karpathy, resolve_image_paths

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


def captions_by_id(images: list[KarpathyImage]) -> dict[str, list[str]]:
    return {image.image_id: image.captions for image in images}


def load_pixels(paths, preprocess, min_side: int | None = None) -> torch.Tensor:
    """Preprocessed pixels (B, 3, H, W) of image files, decoded as the feature cache decodes them."""
    return torch.stack([preprocess(open_rgb(path, min_side)) for path in paths])


@torch.inference_mode()
def encode_images(images: list[KarpathyImage], spec: BackboneSpec, batch_size: int = 64,
                  device: str = "cpu") -> dict[str, np.ndarray]:
    """Visual tokens (1 + patches, width) per image id, as float16 like the feature cache."""
    encoder = load_vision_encoder(spec, device)
    side = encoder.visual.image_size
    min_side = side if isinstance(side, int) else min(side)
    features = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        tokens = encoder(load_pixels([image.path for image in chunk], encoder.preprocess, min_side).to(device))
        features.update((image.image_id, row.cpu().numpy().astype(np.float16)) for image, row in zip(chunk, tokens))
    return features

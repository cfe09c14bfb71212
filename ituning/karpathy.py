"""Caption corpora in the Karpathy split format (dataset_coco.json, dataset_flickr30k.json), read
directly: the images of a split with their captions, and their visual tokens computed in memory.

This is the small-corpus path (the synthetic corpus, a user's own data); the full datasets go
through the catalog and the HDF5 feature cache instead.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ituning.backbones import BackboneSpec, load_vision_encoder

SPLIT_ALIASES = {"train": ("train", "restval")}  # the Karpathy "restval" images train too


@dataclass(frozen=True)
class KarpathyImage:
    image_id: str
    path: Path
    captions: list[str]


def karpathy_image_id(entry: dict) -> str:
    """COCO: str(cocoid); Flickr30k: the file name's stem; otherwise the Karpathy imgid."""
    if "cocoid" in entry:
        return str(entry["cocoid"])
    if "filename" in entry and "filepath" not in entry:
        return Path(entry["filename"]).stem
    return str(entry["imgid"])


def read_karpathy_split(json_path: str | Path, image_root: str | Path, split: str) -> list[KarpathyImage]:
    """The images of one split (train includes restval), sorted by image id."""
    entries = json.loads(Path(json_path).read_text())["images"]
    wanted = SPLIT_ALIASES.get(split, (split,))
    images = [
        KarpathyImage(
            karpathy_image_id(entry),
            Path(image_root) / entry.get("filepath", "") / entry["filename"],
            [sentence["raw"].strip() for sentence in entry["sentences"]],
        )
        for entry in entries
        if entry["split"] in wanted
    ]
    if not images:
        raise ValueError(f"{json_path}: no images in split '{split}'")
    return sorted(images, key=lambda image: image.image_id)


def captions_by_id(images: list[KarpathyImage]) -> dict[str, list[str]]:
    return {image.image_id: image.captions for image in images}


def load_pixels(paths, preprocess) -> torch.Tensor:
    """Preprocessed pixels (B, 3, H, W) of image files, decoded with PIL."""
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(preprocess(image.convert("RGB")))
    return torch.stack(tensors)


@torch.inference_mode()
def encode_images(images: list[KarpathyImage], spec: BackboneSpec, batch_size: int = 64,
                  device: str = "cpu") -> dict[str, np.ndarray]:
    """Visual tokens (1 + patches, width) per image id, as float16 like the feature cache."""
    encoder = load_vision_encoder(spec, device)
    features = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        tokens = encoder(load_pixels([image.path for image in chunk], encoder.preprocess).to(device))
        features.update((image.image_id, row.cpu().numpy().astype(np.float16)) for image, row in zip(chunk, tokens))
    return features

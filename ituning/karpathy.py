"""The images of a small caption corpus with their captions, and their visual tokens computed in
memory (pipeline/small_corpus.py reads them from a Karpathy split file).

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

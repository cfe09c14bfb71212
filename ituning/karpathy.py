"""The images of a small caption corpus with their captions, and their visual tokens computed in
memory (pipeline/small_corpus.py reads them from a Karpathy split file).

This is the small-corpus path (the synthetic corpus, a user's own data); the full datasets go
through the catalog and the HDF5 feature cache instead. Both encode through ituning/encoding.py,
so an image is decoded and preprocessed the same way on either path; here always in float32.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ituning.backbones import BackboneSpec, load_vision_encoder
from ituning.encoding import EncodeSettings, encode_batches
from ituning.images import UnreadableImage


@dataclass(frozen=True)
class KarpathyImage:
    image_id: str
    path: Path
    captions: list[str]


def captions_by_id(images: list[KarpathyImage]) -> dict[str, list[str]]:
    return {image.image_id: image.captions for image in images}


@torch.inference_mode()
def encode_images(images: list[KarpathyImage], spec: BackboneSpec, batch_size: int = 64,
                  device: str = "cpu") -> dict[str, np.ndarray]:
    """Visual tokens (1 + patches, width) per image id, float16 like the feature cache, computed in
    full precision in this process; an unreadable image stops it with UnreadableImage."""
    encoder = load_vision_encoder(spec, device)
    settings = EncodeSettings(batch_size, num_workers=0, device=device, dtype="float16", precision="float32")
    features = {}
    for batch in encode_batches(encoder, [(0, image.image_id, image.path) for image in images], settings):
        failed = [error for error in batch.errors if error]
        if failed:
            raise UnreadableImage(failed[0])
        tokens = batch.host_tokens()
        features.update((image_id, tokens[row].copy()) for row, image_id in enumerate(batch.image_ids))
    return features

"""A model's captions of a split, generated from cached visual tokens, and their scores.

Training validates with it after its epochs, evaluation scores a checkpoint on a test split with
it, and the caption-blind baseline (`blind`: the frozen language model with the modules switched
off) comes from it too. The scores are ituning/evaluation.py's.
"""

import logging
from collections.abc import Callable, Iterable, Mapping

from ituning.data import images_with_captions
from ituning.decoding import BlindStep, DecodingConfig, caption_cached_tokens, caption_texts
from ituning.evaluation import missing_domains_note, score_by_domain, score_captions

Scorer = Callable[[dict[str, str], dict[str, list[str]]], dict[str, float]]

log = logging.getLogger(__name__)


def caption_feature_set(model, tokenizer, features: Mapping, image_ids: list[str], decoding: DecodingConfig,
                        batch_size: int = 64, blind: bool = False) -> dict[str, str]:
    """Captions generated from cached visual tokens, by image id."""
    step = BlindStep if blind else None  # None: as `decoding.compile` says (compiled on CUDA)
    return caption_cached_tokens(lambda visual: caption_texts(model, tokenizer, visual, decoding, step),
                                 features, image_ids, batch_size, "validation captions")


def evaluate_captions(model, tokenizer, features: Mapping, captions: dict[str, list[str]],
                      score: Scorer = score_captions, decoding: DecodingConfig = DecodingConfig(), blind: bool = False) -> dict[str, float]:
    """Scores of captions generated for every image of `captions` (blind: without the image)."""
    image_ids = images_with_captions(captions)
    candidates = caption_feature_set(model, tokenizer, features, image_ids, decoding, blind=blind)
    return score(candidates, {image_id: captions[image_id] for image_id in image_ids})


def generate_captions(captioner, visual_tokens: Mapping, image_ids: Iterable[str], decoding=None,
                      batch_size: int = 32) -> dict[str, str]:
    """Captions for images by id, from cached visual tokens (any mapping image_id -> (N, d) array,
    e.g. a FeatureReader), in batches."""
    decoding = decoding or DecodingConfig()
    return caption_cached_tokens(lambda visual: captioner.caption_features(visual, decoding), visual_tokens,
                                 image_ids, batch_size)


def evaluate_split(captioner, visual_tokens: Mapping, references: Mapping[str, list[str]],
                   domains: Mapping[str, str | None] | None = None, decoding=None, metrics: Iterable[str] | None = None,
                   batch_size: int = 32) -> tuple[dict[str, str], dict]:
    """Caption every referenced image from its cached visual tokens and score the captions:
    (captions, scores), the scores by NoCaps domain when `domains` is given (a warning is logged
    for images without one)."""
    captions = generate_captions(captioner, visual_tokens, sorted(references), decoding, batch_size)
    if domains is None:
        return captions, score_captions(captions, references, metrics)
    note = missing_domains_note(captions, domains)
    if note:
        log.warning(note)
    return captions, score_by_domain(captions, references, domains, metrics)

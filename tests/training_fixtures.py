"""Small inputs for the training tests: random visual tokens, shape captions, a CIDEr scorer."""

import numpy as np

from tests.scene_images import scene_captions

TOKENS = 5


def random_feature_set(image_ids, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {image_id: rng.standard_normal((TOKENS, width)).astype(np.float16) for image_id in image_ids}


def caption_set(images: int, per_image: int = 2, prefix: str = "img") -> dict[str, list[str]]:
    texts = scene_captions()
    return {f"{prefix}{i}": [texts[(i + k) % len(texts)] for k in range(per_image)] for i in range(images)}


def cider_scorer(candidates: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """CIDEr straight from pycocoevalcap over lowercase whitespace tokens (no Java needed)."""
    from pycocoevalcap.cider.cider import Cider

    def tokens(text: str) -> str:
        return " ".join(text.lower().split())

    gts = {key: [tokens(ref) for ref in references[key]] for key in candidates}
    res = {key: [tokens(candidates[key])] for key in candidates}
    score, _ = Cider().compute_score(gts, res)
    return {"CIDEr": float(score)}

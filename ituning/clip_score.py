"""CLIPScore and RefCLIPScore (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric
for Image Captioning"): how well a caption fits its image, by CLIP's image-text agreement.

    CLIP-S(c, v)       = w · max(cos(c, v), 0)                                      w = 2.5
    RefCLIP-S(c, R, v) = H(CLIP-S(c, v), max(max_{r ∈ R} cos(c, r), 0))             H: harmonic mean

c is the CLIP text embedding of the candidate caption, v the CLIP image embedding of its image and
R the text embeddings of the image's references. Every text is encoded as "A photo depicts <text>",
the paper's prompt (its released code prefixes the references too, so that candidate and
references are compared in one form). w stretches the scores over roughly [0, 1]. Corpus scores
are the means over the images. The paper's CLIP is ViT-B/32 (open_clip `ViT-B-32`, tag `openai`).

The formulas are pure functions of embeddings; `ClipScorer` wraps an open_clip CLIP (text tower
included), embeds images through the model's own preprocessing and captions through its tokenizer,
and gives per-image and corpus scores.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ituning.backbones import LOCAL_DIR, BackboneUnavailable, create_open_clip
from ituning.images import open_rgb
from ituning.standins import TINY_VISION, clip_text_tokens

PAPER_WEIGHT = 2.5  # w
CAPTION_PREFIX = "A photo depicts"
PAPER_MODEL = "ViT-B-32"
PAPER_PRETRAINED = "openai"
CLIP_S, REF_CLIP_S = "CLIP-S", "RefCLIP-S"  # metric names, spelled like the COCO ones (BLEU-4, ROUGE-L)

ImageSource = str | Path | Image.Image


# ---- the formulas, on embeddings ---------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity: (N, D), (N, D) -> (N,). Embeddings need not be normalised."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def clip_s(image_emb: torch.Tensor, text_emb: torch.Tensor, w: float = PAPER_WEIGHT) -> torch.Tensor:
    """CLIP-S of each (image, caption) row pair: w · max(cos, 0). (N, D), (N, D) -> (N,)."""
    return w * cosine(image_emb, text_emb).clamp(min=0)


def reference_similarity(text_emb: torch.Tensor, reference_embs: Sequence[torch.Tensor]) -> torch.Tensor:
    """max(max_r cos(c, r), 0) per caption: text_emb (N, D), reference_embs N tensors (R_i, D) -> (N,)."""
    best = [cosine(caption.expand_as(references), references).max() for caption, references
            in zip(text_emb, reference_embs, strict=True)]
    return torch.stack(best).clamp(min=0)


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab / (a + b), and 0 where both are 0."""
    total = a + b
    return torch.where(total > 0, 2 * a * b / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def ref_clip_s(image_emb: torch.Tensor, text_emb: torch.Tensor, reference_embs: Sequence[torch.Tensor],
               w: float = PAPER_WEIGHT) -> torch.Tensor:
    """RefCLIP-S per image: the harmonic mean of CLIP-S and the best reference similarity. (N,)."""
    return harmonic_mean(clip_s(image_emb, text_emb, w), reference_similarity(text_emb, reference_embs))


# ---- per-image and corpus scores -------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionScores:
    clip_s: dict[str, float]  # by image id
    ref_clip_s: dict[str, float]  # by image id; empty when scored without references

    def means(self) -> dict[str, float]:
        """The corpus scores: {"CLIP-S": mean, "RefCLIP-S": mean} (RefCLIP-S only with references)."""
        means = {CLIP_S: _mean(self.clip_s)}
        return {**means, REF_CLIP_S: _mean(self.ref_clip_s)} if self.ref_clip_s else means

    def per_image(self) -> dict[str, dict[str, float]]:
        """{image_id: {"CLIP-S": ..., "RefCLIP-S": ...}}."""
        return {key: {CLIP_S: value, **({REF_CLIP_S: self.ref_clip_s[key]} if key in self.ref_clip_s else {})}
                for key, value in self.clip_s.items()}


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values)


class ClipScorer:
    """A frozen CLIP with its image preprocessing and text tokenizer, scoring captions of images."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenize: Callable[[list[str]], torch.Tensor],
                 device: str = "cpu", w: float = PAPER_WEIGHT):
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess = preprocess  # PIL image -> (3, H, W)
        self.tokenize = tokenize  # texts -> (B, context) token ids
        self.device = device
        self.w = w

    @torch.inference_mode()
    def embed_images(self, images: Sequence[ImageSource], batch_size: int = 64) -> torch.Tensor:
        """(N, D) image embeddings of image files or PIL images."""
        side = _input_side(self.model)
        rows = []
        for start in range(0, len(images), batch_size):
            batch = [self.preprocess(_rgb(image, side)) for image in images[start:start + batch_size]]
            rows.append(self.model.encode_image(torch.stack(batch).to(self.device)).float())  # (B, D)
        return torch.cat(rows)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) text embeddings, each text prompted as the paper does ("A photo depicts ...")."""
        prompted = [f"{CAPTION_PREFIX} {text.strip()}" for text in texts]
        rows = [self.model.encode_text(self.tokenize(prompted[start:start + batch_size]).to(self.device)).float()
                for start in range(0, len(prompted), batch_size)]
        return torch.cat(rows)

    def score(self, candidates: Mapping[str, str], images: Mapping[str, ImageSource],
              references: Mapping[str, Sequence[str]] | None = None) -> CaptionScores:
        """CLIP-S of each image's caption and, with references, RefCLIP-S; `means()` gives the corpus's."""
        keys = sorted(candidates)
        _check_inputs(keys, images, references)
        image_emb = self.embed_images([images[key] for key in keys])
        text_emb = self.embed_texts([candidates[key] for key in keys])
        per_image_clip = clip_s(image_emb, text_emb, self.w)
        if not references:
            return CaptionScores(_by_key(keys, per_image_clip), {})
        counts = [len(references[key]) for key in keys]
        reference_emb = self.embed_texts([text for key in keys for text in references[key]]).split(counts)
        per_image_ref = harmonic_mean(per_image_clip, reference_similarity(text_emb, reference_emb))
        return CaptionScores(_by_key(keys, per_image_clip), _by_key(keys, per_image_ref))


def _check_inputs(keys: list[str], images: Mapping, references: Mapping | None) -> None:
    if not keys:
        raise ValueError("no candidate captions to score")
    without_image = [key for key in keys if key not in images]
    if without_image:
        raise ValueError(f"{len(without_image)} captioned images have no image, e.g. {without_image[:3]}")
    if references:
        without_references = [key for key in keys if not references.get(key)]
        if without_references:
            raise ValueError(f"{len(without_references)} images have no references, e.g. {without_references[:3]}")


def _by_key(keys: list[str], values: torch.Tensor) -> dict[str, float]:
    return dict(zip(keys, values.tolist()))


def _rgb(image: ImageSource, min_side: int | None) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else open_rgb(image, min_side)


def _input_side(model) -> int | None:
    """The shorter side the model's preprocessing resizes to, so that large files decode reduced."""
    size = getattr(model.visual, "image_size", None)
    return size if isinstance(size, int) or size is None else min(size)


def clip_score_captions(candidates: Mapping[str, str], images: Mapping[str, ImageSource],
                        references: Mapping[str, Sequence[str]] | None = None, model: str = PAPER_MODEL,
                        pretrained: str | None = PAPER_PRETRAINED, device: str = "cpu") -> CaptionScores:
    """Per-image CLIP-S (and RefCLIP-S with references) of captions by image id, with the CLIP
    named like a vision backbone: an open_clip name and tag, `hf-hub:org/name` or `local-dir:PATH`."""
    return load_clip_scorer(model, pretrained, device).score(candidates, images, references)


# ---- loading the CLIP ------------------------------------------------------------------------------


def load_clip_scorer(model: str = PAPER_MODEL, pretrained: str | None = PAPER_PRETRAINED,
                     device: str = "cpu") -> ClipScorer:
    """A ClipScorer on a whole open_clip CLIP, loaded as ituning.backbones loads the vision encoder:
    from the hub cache (downloading when the hub is reachable), a local-dir: folder or a weights file.
    Raises BackboneUnavailable with the reason when it cannot be had."""
    import open_clip

    clip, preprocess = _create_clip(model, pretrained, device)
    return ClipScorer(clip, preprocess, _text_tokenizer(open_clip, model), device)


def _create_clip(name: str, pretrained: str | None, device: str):
    model, preprocess = create_open_clip(
        name, pretrained, device, "CLIPScore model",
        "Name a local copy (local-dir:/path/to/open_clip_folder, or a weights file as the pretrained tag).")
    if not hasattr(model, "encode_text"):
        raise BackboneUnavailable(f"{name}: not a whole CLIP (it has no text tower)")
    return model, preprocess


def _text_tokenizer(open_clip, name: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for the model. The demo's stand-in CLIP (ituning/standins.py) reads the
    ids of the stand-in language model's BPE tokenizer, kept beside it in ../language, closed by
    its top id: its own tokenizer is that one, used the way the stand-in was trained."""
    folder = Path(name[len(LOCAL_DIR):]) if name.startswith(LOCAL_DIR) else None
    if folder is None or not _is_standin(folder):
        return open_clip.get_tokenizer(name)
    from transformers import AutoTokenizer

    language = folder.parent / "language"
    if not (language / "tokenizer.json").is_file():
        raise BackboneUnavailable(f"{name}: a stand-in CLIP reads its tokenizer from {language}, which has none")
    tokenizer = AutoTokenizer.from_pretrained(str(language))
    return lambda texts: clip_text_tokens(list(texts), tokenizer)


def _is_standin(folder: Path) -> bool:
    config = json.loads((folder / "open_clip_config.json").read_text())
    return config.get("model_cfg") == json.loads(json.dumps(TINY_VISION))

"""Images in, captions out: the frozen vision encoder, the I-Tuning model and the tokenizer."""

from dataclasses import dataclass
from pathlib import Path

import torch

from ituning.backbones import (
    BackboneSpec,
    VisionEncoder,
    language_model_dimensions,
    load_language_model,
    load_vision_encoder,
    vision_width,
)
from ituning.checkpoint import backbones_of, ituning_config_of, load_weights_into, read_config, save_checkpoint
from ituning.decoding import DecodingConfig, caption_prompt, caption_texts, ranked_beams
from ituning.encoding import encode_pixels, input_side, stack_pixels
from ituning.images import load_images
from ituning.model import ITuningCaptioner, ITuningConfig, count_trainable
from ituning.provenance import Provenance, provenance_of


@dataclass(frozen=True)
class RankedCaption:
    text: str
    tokens: list[int]  # without prompt and EOS
    score: float  # sum of log-probabilities / (generated tokens ** length_penalty)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Captioner:
    def __init__(self, vision: VisionEncoder, model: ITuningCaptioner, tokenizer, backbones: BackboneSpec,
                 provenance: Provenance | None = None):
        self.vision = vision
        self.model = model
        self.tokenizer = tokenizer
        self.backbones = backbones
        self.provenance = provenance  # where the module weights come from, when the checkpoint records it

    @classmethod
    def from_backbones(cls, backbones=BackboneSpec(), config=ITuningConfig(), device="auto"):
        """Fresh, untrained modules on the given backbones."""
        device = resolve_device(device)
        vision = load_vision_encoder(backbones, device)
        language_model, tokenizer = load_language_model(backbones.language_model, device)
        model = ITuningCaptioner(language_model, vision.width, config).to(device)
        return cls(vision, model, tokenizer, backbones)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device="auto"):
        config = read_config(directory)
        captioner = cls.from_backbones(backbones_of(config, directory), ituning_config_of(config), device)
        load_weights_into(captioner.model, directory, captioner.backbones)
        captioner.model.eval()
        captioner.provenance = provenance_of(config)
        return captioner

    def save(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, self.model, self.backbones, self.provenance)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def prompt_ids(self) -> torch.Tensor:
        return torch.tensor([caption_prompt(self.tokenizer)], device=self.device)  # (1, P)

    def caption_features(self, visual: torch.Tensor, decoding=DecodingConfig()) -> list[str]:
        """Captions for visual tokens (B, N, d_v), e.g. read from the feature cache."""
        return caption_texts(self.model, self.tokenizer, visual, decoding)

    def encode_images(self, images) -> torch.Tensor:
        """Visual tokens (B, 1 + P, d_v) of decoded images, on the model's device."""
        return encode_pixels(self.vision, stack_pixels(images, self.vision.preprocess), self.device)

    @torch.inference_mode()
    def caption_images(self, images, decoding=DecodingConfig(), batch_size: int = 16) -> list[str]:
        captions = []
        for start in range(0, len(images), batch_size):
            captions += self.caption_features(self.encode_images(images[start : start + batch_size]), decoding)
        return captions

    @torch.inference_mode()
    def ranked_captions(self, visual: torch.Tensor, decoding=DecodingConfig()) -> list[RankedCaption]:
        """Every finished beam for one image's visual tokens (1, N, d_v), best first; the first is
        `caption_features`' caption. Greedy decoding (num_beams=1) has no beams to rank."""
        if decoding.num_beams < 2:
            raise ValueError("ranked beams need num_beams >= 2")
        visual = visual.to(self.device, dtype=next(self.model.parameters()).dtype)
        beams = ranked_beams(self.model, visual, self.prompt_ids(), self.eos_id, decoding)[0]
        return [RankedCaption(self.tokenizer.decode(beam.tokens, skip_special_tokens=True).strip(), beam.tokens,
                              beam.score) for beam in beams]

    @property
    def input_side(self) -> int:
        """The side images are resized to for the vision encoder (the shorter one if not square)."""
        return input_side(self.vision)

    def caption_files(self, paths, decoding=DecodingConfig(), batch_size: int = 16):
        """(path, caption, error) per file; an unreadable file (missing, not an image, over PIL's
        pixel limit) gets its error, the rest a caption. Files are decoded one batch at a time, very
        large ones at reduced size (ituning.images.open_rgb)."""
        paths, results = list(paths), []
        for start in range(0, len(paths), batch_size):
            loaded = load_images(paths[start : start + batch_size], self.input_side)
            captions = iter(self.caption_images([item.image for item in loaded if item.error is None],
                                                decoding, batch_size))
            results += [(item.path, None if item.error else next(captions), item.error) for item in loaded]
        return results


def trainable_count(language_model="gpt2", vision_model="ViT-B-16", drop_first=0, bottleneck=None) -> int:
    """Trainable parameters of I-Tuning on these backbones, from their configurations alone
    (built on the meta device: nothing is downloaded or allocated)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd, n_layer, n_head = language_model_dimensions(language_model)
    config = ITuningConfig(drop_first=drop_first, bottleneck=bottleneck)
    with torch.device("meta"):
        language = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head))
        model = ITuningCaptioner(language, vision_width(vision_model), config)
    return count_trainable(model)

"""I-Tuning: lightweight image captioning with a frozen CLIP-ViT and a frozen GPT-2."""

from ituning.compat import ensure_torchvision_importable

ensure_torchvision_importable()

from ituning.backbones import BackboneSpec, BackboneUnavailable, load_language_model, load_vision_encoder  # noqa: E402
from ituning.captioner import Captioner, trainable_count  # noqa: E402
from ituning.checkpoint import IncompatibleCheckpoint, save_checkpoint  # noqa: E402
from ituning.config import RunConfig, load_config  # noqa: E402
from ituning.decoding import DecodingConfig, beam_search, generate, greedy_search  # noqa: E402
from ituning.model import ITuningCaptioner, ITuningConfig, ITuningModule  # noqa: E402
from ituning.training import StageData, train_run  # noqa: E402

__all__ = [
    "BackboneSpec", "BackboneUnavailable", "Captioner", "DecodingConfig", "ITuningCaptioner",
    "ITuningConfig", "ITuningModule", "IncompatibleCheckpoint", "beam_search", "generate",
    "greedy_search", "load_config", "load_language_model", "load_vision_encoder", "RunConfig", "save_checkpoint",
    "StageData", "train_run", "trainable_count",
]

"""I-Tuning, the science: lightweight image captioning with a frozen CLIP-ViT and a frozen GPT-2
joined by small trainable cross-attention modules.

The model and its modules, the frozen backbones, image-to-token encoding, decoding (greedy and
beam search), the training loop, checkpoints and the caption metrics. Everything here works on
tensors, arrays, files and configs handed to it.

Import rule: ituning/ imports no other folder of the project (not storage/, pipeline/, tasks/ or
flows/); tests/test_layers.py checks it. The names below are imported on first use, so
`import ituning` stays cheap until one of them is needed.

Importing the package is also where the environment is prepared, once per process: where a CPU-only
torch meets a CUDA torchvision build, torchvision's first import is made to work (ituning/compat.py).
"""

from importlib import import_module

from ituning.compat import install_finder

install_finder()  # before open_clip or transformers import torchvision

_EXPORTS = {
    "BackboneSpec": "backbones", "BackboneUnavailable": "backbones", "load_language_model": "backbones",
    "load_vision_encoder": "backbones",
    "Captioner": "captioner", "trainable_count": "captioner",
    "IncompatibleCheckpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "RunConfig": "config", "load_config": "config",
    "DecodingConfig": "decoding", "beam_search": "decoding", "generate": "decoding", "greedy_search": "decoding",
    "ITuningCaptioner": "model", "ITuningConfig": "model", "ITuningModule": "model",
    "StageData": "training", "train_run": "training",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ituning' has no attribute {name!r}")
    return getattr(import_module(f"ituning.{_EXPORTS[name]}"), name)

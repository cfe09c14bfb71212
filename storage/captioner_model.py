"""The trained captioner as an MLflow pyfunc model: images in, captions out.

This file is logged as the model's code (MLflow's "models from code"), so no Python object is
pickled. The model's artifacts are the checkpoint (module weights + adapter_config.json) and the
local backbone folders it was trained on; loading points the checkpoint's backbones at those
bundled copies, so the model loads from the run alone.

Input: a list of images as base64-encoded file bytes (PNG, JPEG, ...), e.g. the REST body
{"inputs": ["iVBORw0KGgo..."]}; file paths too when logged with accept_file_paths. Output: one caption each.
"""

import base64
import binascii
import io
import json
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError

CHECKPOINT = "checkpoint"
VISION_FOLDER = "vision_backbone"
VISION_WEIGHTS = "vision_weights"
LANGUAGE_FOLDER = "language_backbone"


def relocate_backbones(backbones: dict, artifacts: dict) -> dict:
    """The checkpoint's backbones with each bundled local backbone replaced by its artifact path."""
    from ituning.backbones import LOCAL_DIR

    relocated = dict(backbones)
    if VISION_FOLDER in artifacts:
        relocated["vision_model"] = f"{LOCAL_DIR}{artifacts[VISION_FOLDER]}"
    if VISION_WEIGHTS in artifacts:
        relocated["vision_pretrained"] = artifacts[VISION_WEIGHTS]
    if LANGUAGE_FOLDER in artifacts:
        relocated["language_model"] = artifacts[LANGUAGE_FOLDER]
    return relocated


def relocated_checkpoint(artifacts: dict) -> Path:
    """A copy of the bundled checkpoint whose config names the bundled backbones."""
    from ituning.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    source = Path(artifacts[CHECKPOINT])
    config = json.loads((source / CONFIG_FILE).read_text())
    config["backbones"] = relocate_backbones(config["backbones"], artifacts)
    target = Path(tempfile.mkdtemp(prefix="ituning-checkpoint-"))
    shutil.copyfile(source / WEIGHTS_FILE, target / WEIGHTS_FILE)
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return target


def decode_image(item: str, accept_file_paths: bool) -> Image.Image:
    from ituning.images import UnreadableImage, open_rgb

    try:
        if accept_file_paths and Path(item).is_file():
            return open_rgb(item)
        with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as image:
            return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, UnreadableImage, OSError, ValueError) as error:
        raise MlflowException(f"not a base64-encoded image: {str(item)[:40]!r} ({error})",
                              error_code=INVALID_PARAMETER_VALUE) from error


class CaptionerModel(PythonModel):
    def load_context(self, context):
        from ituning.captioner import Captioner
        from ituning.decoding import DecodingConfig

        settings = context.model_config or {}
        device = settings.get("serving_device", settings.get("device", "auto"))  # "device": older models
        self.captioner = Captioner.from_checkpoint(relocated_checkpoint(context.artifacts), device=device)
        self.decoding = DecodingConfig(**settings.get("decoding", {}))
        self.accept_file_paths = bool(settings.get("accept_file_paths", False))

    def predict(self, model_input: list[str], params=None) -> list[str]:
        images = [decode_image(item, self.accept_file_paths) for item in model_input]
        return self.captioner.caption_images(images, self.decoding) if images else []


mlflow.models.set_model(CaptionerModel())

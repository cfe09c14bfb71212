"""The trained captioner as an MLflow pyfunc model: images in, captions out.

This file is logged as the model's code (MLflow's "models from code"), so no Python object is
pickled. The model's artifacts are the checkpoint (module weights + adapter_config.json) and the
local backbone folders it was trained on; loading points the checkpoint's backbones at those
bundled copies, so the model loads from the run alone.

Input: a list of images as base64-encoded file bytes (PNG, JPEG, ...), e.g. the REST body
{"inputs": ["iVBORw0KGgo..."]}; file paths too when logged with accept_file_paths. Output: one caption each.

A request is refused, with a 400 and a message naming the input and the reason, when an input is not
an image, when its images hold more than `max_request_mb` MB of file bytes, or more than
`max_request_megapixels` million pixels together (read from their headers before anything is decoded,
so a small file claiming a huge image costs nothing); both limits come from the model_config. An error
while captioning answers 500 and is logged with its traceback by the server. Answers carry the message
alone: no stack trace, and not the input (MLflow's scoring server would quote the whole input).
"""

import base64
import binascii
import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError

CHECKPOINT = "checkpoint"
VISION_FOLDER = "vision_backbone"
VISION_WEIGHTS = "vision_weights"
LANGUAGE_FOLDER = "language_backbone"
_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestLimits:
    max_request_mb: float = 20  # image file bytes in one request, base64-decoded
    max_request_megapixels: float = 200  # pixels of one request's images together (about 3 bytes each decoded)

    @classmethod
    def from_model_config(cls, settings: dict) -> "RequestLimits":
        return cls(**{field.name: float(settings[field.name]) for field in fields(cls) if field.name in settings})


class ServingError(MlflowException):
    """An error answered with its message alone. MLflow's scoring server puts "Failed to predict data
    '<the whole input>'" in front of a model's error message; this message ignores that rewrite, so a
    refused 20 MB request is not sent back to its client."""

    def __init__(self, message: str, error_code: int = BAD_REQUEST):
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self.args[0]

    @message.setter
    def message(self, value: str) -> None:
        pass  # set once, from the constructor's argument


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
    config.pop("workspace", None)  # the bundled backbones stand in for those of the workspace it was trained in
    target = Path(tempfile.mkdtemp(prefix="ituning-checkpoint-"))
    shutil.copyfile(source / WEIGHTS_FILE, target / WEIGHTS_FILE)
    (target / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return target


def image_file_bytes(item: str, accept_file_paths: bool) -> bytes:
    """The image file an input names: base64-encoded bytes, or a path when those are accepted."""
    if accept_file_paths and Path(item).is_file():
        return Path(item).read_bytes()
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ServingError(f"not a base64-encoded image: {str(item)[:40]!r} ({error})") from error


def file_size(item: str, accept_file_paths: bool) -> int:
    """The bytes an input's image file holds, known before decoding it."""
    if accept_file_paths and Path(item).is_file():
        return Path(item).stat().st_size
    return len(item) * 3 // 4


def header_pixels(data: bytes) -> int:
    """Width x height as the image file's header states them; nothing is decoded."""
    from ituning.images import UnreadableImage

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width * image.height
    except Image.DecompressionBombError as error:  # over twice PIL's limit: refused with the count
        raise UnreadableImage(f"too large to decode ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UnreadableImage("not an image file") from error


def decode_file(data: bytes) -> Image.Image:
    from ituning.images import UnreadableImage, open_rgb

    try:
        return open_rgb(io.BytesIO(data))
    except UnreadableImage as error:
        raise ServingError(f"not a readable image ({error})") from error


def decode_image(item: str, accept_file_paths: bool) -> Image.Image:
    return decode_file(image_file_bytes(item, accept_file_paths))


def check_size(items: list[str], limits: RequestLimits, accept_file_paths: bool) -> None:
    megabytes = sum(file_size(item, accept_file_paths) for item in items) / 1e6
    if megabytes > limits.max_request_mb:
        raise ServingError(f"the request holds {megabytes:.1f} MB of images, over the limit of "
                           f"{limits.max_request_mb:g} MB (max_request_mb); send fewer or smaller images")


def check_pixels(files: list[bytes], limits: RequestLimits) -> None:
    from ituning.images import UnreadableImage

    megapixels = 0.0
    for index, data in enumerate(files):
        try:
            megapixels += header_pixels(data) / 1e6
        except UnreadableImage as error:
            raise ServingError(f"input {index}: {error}") from error
    if megapixels > limits.max_request_megapixels:
        raise ServingError(f"the request's images hold {megapixels:,.0f} million pixels, over the limit of "
                           f"{limits.max_request_megapixels:,g} million (max_request_megapixels)")


def each_input(function, items: list) -> list:
    """`function` over the inputs; an error names the input it came from."""
    results = []
    for index, item in enumerate(items):
        try:
            results.append(function(item))
        except ServingError as error:
            raise ServingError(f"input {index}: {error}") from error
    return results


class CaptionerModel(PythonModel):
    def load_context(self, context):
        from ituning.captioner import Captioner
        from ituning.decoding import DecodingConfig

        settings = context.model_config or {}
        device = settings.get("serving_device", settings.get("device", "auto"))  # "device": older models
        self.captioner = Captioner.from_checkpoint(relocated_checkpoint(context.artifacts), device=device)
        self.decoding = DecodingConfig(**settings.get("decoding", {}))
        self.accept_file_paths = bool(settings.get("accept_file_paths", False))
        self.limits = RequestLimits.from_model_config(settings)

    def predict(self, model_input: list[str], params=None) -> list[str]:
        """Refuses a request over the limits before decoding any image in it."""
        check_size(model_input, self.limits, self.accept_file_paths)
        files = each_input(lambda item: image_file_bytes(item, self.accept_file_paths), model_input)
        check_pixels(files, self.limits)
        images = each_input(decode_file, files)
        try:
            return self.captioner.caption_images(images, self.decoding) if images else []
        except Exception as error:
            _logger.exception("captioning %d images failed", len(images))
            raise ServingError(f"captioning failed ({type(error).__name__}); see the model server's log",
                               INTERNAL_ERROR) from error


mlflow.models.set_model(CaptionerModel())

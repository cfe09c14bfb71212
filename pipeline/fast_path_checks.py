"""Where each fast path runs, and its first-use check on a tiny model (what `ituning doctor` shows).

`availability(device)` says for each fast path of ituning/fast_paths.py whether `auto` turns it on
on a device, and why not. `self_check(device, folder)` then runs the paths that are on through the
same wiring as a real run, at toy size: one epoch of a tiny stage (random stand-in backbones, random
visual tokens, validation with beam 2: the compiled loss, the data on the device, the measured
micro-batch, compiled decoding) and a few rendered JPEGs through the encoder (nvJPEG decoding).
Each path's outcome is what its first-use check decided: "on", or the reason it fell back.
"""

from pathlib import Path

import numpy as np
import torch

from ituning.fast_paths import (COMPILE, DATA_ON_DEVICE, DEVICE_JPEG, MICRO_BATCH, PATHS, STATIC_DECODING,
                                forget_outcomes, outcomes)

CAPTIONS = ["a red square on a blue field", "two green circles side by side", "a yellow line across the sky",
            "a small dog near a big tree", "a boat on calm water", "three birds above the hills"]


def availability(device: torch.device) -> dict[str, str]:
    """Each path's name: "" where `auto` turns it on on `device`, else why not."""
    from ituning.device_jpeg import nvjpeg_problem
    from ituning.static_decoding import static_cache_supported

    cuda = device.type == "cuda"
    off = "" if cuda else f"auto turns it on on CUDA only (the device is {device})"
    reasons = {COMPILE: off, DATA_ON_DEVICE: off, MICRO_BATCH: off, STATIC_DECODING: off, DEVICE_JPEG: off}
    if cuda and not static_cache_supported():
        reasons[STATIC_DECODING] = "this transformers' StaticCache does not keep its position as a tensor"
    if cuda and (problem := nvjpeg_problem(str(device))):
        reasons[DEVICE_JPEG] = problem
    return {path.name: "" if path.available(not reasons[path]) else reasons[path] for path in PATHS}


def self_check(device: torch.device, folder: Path) -> dict[str, str]:
    """Each path `auto` turns on here, checked on a tiny model in `folder`: "on" or why it fell back."""
    forget_outcomes()
    available = {name for name, reason in availability(device).items() if not reason}
    if not available:
        return {}
    from ituning.standins import build_random_standins

    spec = build_random_standins(folder / "backbones", CAPTIONS * 4)
    if available & {COMPILE.name, DATA_ON_DEVICE.name, MICRO_BATCH.name, STATIC_DECODING.name}:
        _train_tiny_stage(spec, device, folder / "run")
    if DEVICE_JPEG.name in available:
        _encode_rendered_jpegs(spec, device, folder / "images")
    return {name: outcome for name, outcome in outcomes().items() if name in available}


def _train_tiny_stage(spec, device: torch.device, folder: Path) -> None:
    """One epoch of 24 captions on 12 images, paths on auto, validated with beam 2."""
    from ituning.config import config_from_dict
    from ituning.training import StageData, train_run

    images = {f"image-{index}": [CAPTIONS[index % len(CAPTIONS)], CAPTIONS[(index + 1) % len(CAPTIONS)]]
              for index in range(12)}
    generator = np.random.default_rng(0)
    width = 128  # the stand-in ViT's token width
    tokens = {image_id: generator.standard_normal((5, width)).astype(np.float16) for image_id in images}
    config = config_from_dict({
        "name": "self-check", "device": str(device),
        "model": {"vision_model": spec.vision_model, "vision_pretrained": None, "language_model": spec.language_model},
        "stages": [{"name": "check", "dataset": "coco", "epochs": 1, "batch_size": 8, "micro_batch_size": "auto",
                    "val_images": 4, "val_beams": 2, "val_max_length": 5}]})
    data = StageData(tokens, images, tokens, images)
    train_run(config, {"check": data}, folder, score=lambda candidates, references: {"CIDEr": 0.0},
              device=str(device), resume=False, progress=False)


def _encode_rendered_jpegs(spec, device: torch.device, folder: Path) -> None:
    """Four rendered JPEGs (smooth gradients with a few flat rectangles, as photos are mostly smooth)
    through the encoder with decode_on_device auto."""
    from PIL import Image, ImageDraw

    from ituning.backbones import load_vision_encoder
    from ituning.encoding import EncodeSettings, encode_batches

    folder.mkdir(parents=True, exist_ok=True)
    generator, items = np.random.default_rng(1), []
    rows, columns = np.mgrid[0:96, 0:128]
    for index in range(4):
        pixels = np.stack([rows * 2 + index * 20, columns * 2, (rows + columns) // 2], axis=-1) % 256
        image = Image.fromarray(pixels.astype(np.uint8))
        for _ in range(3):
            left, top = (int(value) for value in generator.integers(0, 80, 2))
            colour = tuple(generator.integers(0, 256, 3).tolist())
            ImageDraw.Draw(image).rectangle((left, top, left + 30, top + 20), fill=colour)
        path = folder / f"{index}.jpg"
        image.save(path, quality=90)
        items.append((0, str(index), str(path)))
    encoder = load_vision_encoder(spec, str(device))
    for batch in encode_batches(encoder, items, EncodeSettings(batch_size=4, num_workers=0, device=str(device))):
        batch.host_tokens()


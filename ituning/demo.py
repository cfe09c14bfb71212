"""The offline captioning path on untrained stand-in backbones built on the spot.

Build tiny backbones in the standard formats, attach fresh I-Tuning modules, save the checkpoint,
load it back through the normal loaders and caption a few rendered images: every loader and the
decoding path, offline, in seconds. (`make demo` runs the whole pipeline instead; see README.)
"""

import random
from pathlib import Path

from PIL import Image, ImageDraw

from ituning.captioner import Captioner
from ituning.decoding import DecodingConfig
from ituning.standins import build_random_standins

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def render_shape_image(colour: str, shape: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 240))
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def shape_captions() -> list[str]:
    return [f"a {colour} {shape} in the middle" for colour in COLOURS for shape in SHAPES]


def run_offline_demo(workspace: str | Path, images: int = 4, seed: int = 0) -> list[tuple]:
    workspace = Path(workspace)
    rng = random.Random(seed)
    image_paths = []
    for index in range(images):
        path = workspace / "images" / f"shape_{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_shape_image(rng.choice(list(COLOURS)), rng.choice(SHAPES)).save(path)
        image_paths.append(path)
    backbones = build_random_standins(workspace / "backbones", shape_captions() * 20, seed)
    checkpoint = Captioner.from_backbones(backbones, device="cpu").save(workspace / "checkpoint")
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    return captioner.caption_files(image_paths, DecodingConfig(num_beams=5, max_length=12))

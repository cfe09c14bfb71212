"""Test images and captions from storage/scenes.py, the renderer of the synthetic corpus."""

import random

from PIL import Image

from storage.scenes import Scene, ShapeGroup, describe, random_scene, render_scene

MIDDLE = ((1, 1),)  # the centre cell of the scene's 3x3 grid


def shape_image(colour: str, shape: str, size: int = 96) -> Image.Image:
    """One `colour` `shape` in the middle of a white picture (colours and shapes of storage/scenes.py)."""
    return render_scene(Scene((ShapeGroup(colour, shape, MIDDLE),), "white"), size)


def scene_captions(scenes: int = 8, seed: int = 0) -> list[str]:
    """One true caption of each of `scenes` random scenes."""
    rng = random.Random(seed)
    return [describe(random_scene(rng), rng, count=1)[0] for _ in range(scenes)]

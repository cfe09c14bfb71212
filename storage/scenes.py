"""Rendered scenes with true, learnable captions: the images of the synthetic corpus.

A scene holds one or two groups of identical shapes (a colour, a shape, a count of 1-3) on a
3x3 grid. Its captions name what is there in several phrasings -- colours, shapes, counts and
positions -- so a captioner trained on them can be scored meaningfully, and one that ignores
the image cannot do well.
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 220),
    "yellow": (235, 205, 35), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "grey": (175, 175, 175), "black": (25, 25, 25)}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
ROW_WORDS = ("top", "middle", "bottom")
COLUMN_WORDS = ("left", "middle", "right")


@dataclass(frozen=True)
class ShapeGroup:
    colour: str
    shape: str
    cells: tuple[tuple[int, int], ...]  # (row, column) on the 3x3 grid, one per shape

    @property
    def phrase(self) -> str:
        count = len(self.cells)
        noun = self.shape if count == 1 else f"{self.shape}s"
        article = "an" if count == 1 and self.colour[0] in "aeiou" else COUNT_WORDS[count]
        return f"{article} {self.colour} {noun}"

    @property
    def position(self) -> str:
        """Where a single shape is; groups of several are described by count alone."""
        row, column = self.cells[0]
        if (row, column) == (1, 1):
            return "in the middle"
        if row == 1:
            return f"on the {COLUMN_WORDS[column]}"
        if column == 1:
            return f"at the {ROW_WORDS[row]}"
        return f"in the {ROW_WORDS[row]} {COLUMN_WORDS[column]} corner"


@dataclass(frozen=True)
class Scene:
    groups: tuple[ShapeGroup, ...]
    background: str


def random_scene(rng: random.Random) -> Scene:
    cells = [(row, column) for row in range(3) for column in range(3)]
    rng.shuffle(cells)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], k=rng.choice((1, 1, 2)))
    groups = []
    for colour, shape in kinds:
        count = rng.choice((1, 1, 1, 2, 3))
        groups.append(ShapeGroup(colour, shape, tuple(cells[:count])))
        del cells[:count]
    return Scene(tuple(groups), rng.choice(list(BACKGROUNDS)))


def render_scene(scene: Scene, size: int = 128) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for group in scene.groups:
        for row, column in group.cells:
            left, top = column * cell + cell * 0.15, row * cell + cell * 0.15
            box = (left, top, left + cell * 0.7, top + cell * 0.7)
            _draw_shape(draw, group.shape, box, COLOURS[group.colour])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


def describe(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """`count` true captions in different phrasings (repeated only if too few phrasings exist)."""
    phrasings = _single_phrasings(scene) if len(scene.groups) == 1 else _pair_phrasings(scene)
    rng.shuffle(phrasings)
    return [phrasings[index % len(phrasings)] for index in range(count)]


def _single_phrasings(scene: Scene) -> list[str]:
    group = scene.groups[0]
    phrasings = [group.phrase, f"a picture of {group.phrase}", f"{group.phrase} on a {scene.background} background"]
    if len(group.cells) == 1:
        phrasings += [f"{group.phrase} {group.position}", f"there is {group.phrase} {group.position}"]
    else:
        phrasings += [f"there are {group.phrase}", f"{group.phrase} on {scene.background}"]
    return phrasings


def _pair_phrasings(scene: Scene) -> list[str]:
    first, second = scene.groups
    verb = "is" if len(first.cells) == 1 else "are"
    return [
        f"{first.phrase} and {second.phrase}",
        f"{second.phrase} and {first.phrase}",
        f"a picture of {first.phrase} and {second.phrase}",
        f"there {verb} {first.phrase} and {second.phrase}",
        f"{first.phrase} next to {second.phrase} on a {scene.background} background",
    ]

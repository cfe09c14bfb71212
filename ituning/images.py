"""Reading image files with a clear reason for every one that cannot be used.

`open_rgb` is the one place the pipeline decodes an image: the catalog check, the feature cache,
captioning and the served model all read images through it, so they all see the same pixels.

- EXIF orientation is applied: a photo stored sideways comes out upright, with its upright size.
- 16-bit grayscale (Pillow modes I;16, I;16B, ... and I) is scaled to 8 bits by keeping the high
  byte (65535 -> 255), the way Pillow itself reads 16-bit RGB and RGBA PNGs; a plain conversion
  would clip nearly every pixel to white.
- An image with more pixels than PIL's limit (`Image.MAX_IMAGE_PIXELS`) is unreadable, and is
  refused from its header before anything is decoded.
- With `min_side` (the side the image will be resized to), an image whose shorter side exceeds
  REDUCE_ABOVE times `min_side` is decoded at reduced size: JPEG at 1/2, 1/4 or 1/8 scale while
  decoding, then a box reduction, keeping the shorter side at least KEEP_SIDE times `min_side` for
  the final resize. Every other image decodes exactly as stored.
"""

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REDUCE_ABOVE = 4  # reduce only images more than this many times larger than needed ...
KEEP_SIDE = 2  # ... and keep twice the needed side, so the final resize still averages real pixels

# open_rgb refuses images over the pixel limit itself, naming the pixel count; Pillow's warning
# (given from the header of an image between the limit and twice the limit) would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UnreadableImage(ValueError):
    """An image file that is missing, truncated, not an image or too large to decode."""


@dataclass(frozen=True)
class LoadedImage:
    path: Path
    image: Image.Image | None = None
    error: str | None = None


def open_rgb(source: str | Path | BinaryIO, min_side: int | None = None) -> Image.Image:
    """The decoded, upright image in RGB (grayscale, 16-bit, palette, CMYK and alpha images are
    converted); `source` is a path or an open binary file. Raises UnreadableImage with the reason."""
    label = source if isinstance(source, (str, Path)) else "image data"
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise UnreadableImage(f"{label}: no such file")
    try:
        with Image.open(source) as image:
            _check_pixel_limit(image.width * image.height, label)
            scale = decode_scale(min(image.size), min_side)
            if scale > 1:  # JPEG: decoded at 1/2, 1/4 or 1/8 size; other formats ignore a draft
                image.draft(None, (image.width // scale, image.height // scale))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            rgb = to_rgb(image)
    except UnreadableImage:  # over the limit, found above; a ValueError, not a decoding failure
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:  # refused by Pillow itself
        _check_pixel_limit(_pixels_named_in(error), label)
        raise UnreadableImage(f"{label}: too large to decode ({error})") from error
    except UnidentifiedImageError as error:
        raise UnreadableImage(f"{label}: not an image file") from error
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports truncation as OSError
        raise UnreadableImage(f"{label}: cannot decode ({error})") from error
    further = min(rgb.size) // (KEEP_SIDE * min_side) if scale > 1 else 1
    return rgb.reduce(further) if further > 1 else rgb


def decode_scale(shorter_side: int, min_side: int | None) -> int:
    """How many times smaller an image may be decoded when it will be resized to `min_side`: 1 unless
    its shorter side exceeds REDUCE_ABOVE * min_side, else as much as keeps KEEP_SIDE * min_side."""
    if not min_side or shorter_side <= REDUCE_ABOVE * min_side:
        return 1
    return shorter_side // (KEEP_SIDE * min_side)


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of a decoded image; 16-bit grayscale keeps its high byte rather than clipping."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        high_bytes = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)  # (H, W)
        return Image.fromarray(high_bytes, "L").convert("RGB")
    return image.convert("RGB")


def within_pixel_limit(pixels: int) -> bool:
    """Whether an image of this many pixels may be decoded (PIL.Image.MAX_IMAGE_PIXELS, None: no limit)."""
    return Image.MAX_IMAGE_PIXELS is None or pixels <= Image.MAX_IMAGE_PIXELS


def _check_pixel_limit(pixels: int | None, label) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if pixels is not None and not within_pixel_limit(pixels):
        raise UnreadableImage(f"{label}: too large to decode: {pixels:,} pixels, over the limit of "
                              f"{limit:,} (PIL.Image.MAX_IMAGE_PIXELS)")


def _pixels_named_in(error: Exception) -> int | None:
    """The pixel count in Pillow's decompression-bomb message, "Image size (N pixels) exceeds ..."."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return int(found.group(1)) if found else None


def load_images(paths, min_side: int | None = None) -> list[LoadedImage]:
    loaded = []
    for path in paths:
        try:
            loaded.append(LoadedImage(Path(path), image=open_rgb(path, min_side)))
        except UnreadableImage as error:
            loaded.append(LoadedImage(Path(path), error=str(error)))
    return loaded

"""Deciding, for every catalogued image file, whether the pipeline can use it and why not.

status: "ok" (decodes; `reason` notes any conversion: grayscale/16-bit/CMYK to RGB, PNG content
named .jpg), "missing", "unreadable" (truncated, not an image, undecodable, or more pixels than
PIL.Image.MAX_IMAGE_PIXELS: the reason names the count and the limit), "excluded" (kept out of a
split on purpose) or "unchecked" (catalogued without opening the file). width and height are those
of the upright image, after its EXIF orientation.
"""

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from ituning.images import UnreadableImage, open_rgb

FORMAT_SUFFIXES = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "GIF": (".gif",), "WEBP": (".webp",),
                   "BMP": (".bmp",), "TIFF": (".tif", ".tiff")}


def inspect_image(path: Path) -> tuple[str, str | None, int | None, int | None]:
    """(status, reason, width, height) of one image file, decoded exactly as training reads it."""
    if not path.is_file():
        return "missing", "no such file", None, None
    try:
        image = open_rgb(path)
    except UnreadableImage as error:
        return "unreadable", str(error).removeprefix(f"{path}: "), None, None
    with Image.open(path) as raw:
        mode, image_format = raw.mode, raw.format
    notes = []
    if mode == "I" or mode.startswith("I;16"):
        notes.append(f"16-bit {mode} image scaled to 8-bit RGB")
    elif mode != "RGB":
        notes.append(f"{mode} image converted to RGB")
    if image_format in FORMAT_SUFFIXES and path.suffix.lower() not in FORMAT_SUFFIXES[image_format]:
        notes.append(f"{image_format} content in a {path.suffix} file")
    return "ok", "; ".join(notes) or None, image.width, image.height


def inspect_images(paths: list[Path], workers: int = 2,
                   parallel_from: int = 256) -> list[tuple[str, str | None, int | None, int | None]]:
    """inspect_image over many files, in `workers` processes when there are `parallel_from` or more."""
    if workers <= 1 or len(paths) < parallel_from:
        return [inspect_image(path) for path in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(inspect_image, paths, chunksize=64))

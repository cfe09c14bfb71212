"""Reading image files with a clear reason for every one that cannot be used."""

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class UnreadableImage(ValueError):
    """An image file that is missing, truncated or not an image."""


@dataclass(frozen=True)
class LoadedImage:
    path: Path
    image: Image.Image | None = None
    error: str | None = None


def open_rgb(path: str | Path) -> Image.Image:
    """The fully decoded image in RGB (grayscale, palette, CMYK and alpha images are converted)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError as error:
        raise UnreadableImage(f"{path}: not an image file") from error
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports truncation as OSError
        raise UnreadableImage(f"{path}: cannot decode ({error})") from error


def load_images(paths) -> list[LoadedImage]:
    loaded = []
    for path in paths:
        try:
            loaded.append(LoadedImage(Path(path), image=open_rgb(path)))
        except UnreadableImage as error:
            loaded.append(LoadedImage(Path(path), error=str(error)))
    return loaded

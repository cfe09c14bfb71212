"""An HTML caption gallery: each image with its generated caption (and that caption's scores, such
as CLIP-S and RefCLIP-S, when given) and its reference captions.

The page stands alone: images are either copied into an images/ folder beside it or embedded
as data URIs: one file, which is what a tracking UI's artifact viewer can show (it cannot follow
a page's relative links). Embedded images may be shrunk to JPEG thumbnails to keep the page small;
heatmap grids are embedded at full size, each in a row of its own as wide as the page.
"""

import base64
import html
import io
import mimetypes
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ituning.images import open_rgb

PAGE_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.5em;vertical-align:top;text-align:left}"
    "img.photo{max-width:240px;max-height:240px}.generated{font-weight:bold}"
    "img.heatmap{width:100%;max-width:1150px;height:auto}.scores{font-weight:normal;color:#555;margin-top:.5em}"
)
THUMBNAIL_QUALITY = 85


@dataclass(frozen=True)
class GalleryItem:
    image_id: str
    image_path: Path
    caption: str
    references: list[str] = field(default_factory=list)
    heatmap_path: Path | None = None
    scores: dict[str, float] = field(default_factory=dict)  # the caption's, by metric name


def gallery_items(captions: dict[str, str], references: dict[str, list[str]], image_paths: dict[str, Path],
                  heatmaps: dict[str, Path] | None = None, limit: int | None = None,
                  scores: dict[str, dict[str, float]] | None = None) -> list[GalleryItem]:
    """Items for the captioned images that have an image file, in image_id order; `scores` are
    each caption's by image id ({image_id: {"CLIP-S": ..., "RefCLIP-S": ...}})."""
    heatmaps, scores = heatmaps or {}, scores or {}
    items = [
        GalleryItem(key, Path(image_paths[key]), captions[key], list(references.get(key, [])), heatmaps.get(key),
                    dict(scores.get(key, {})))
        for key in sorted(captions)
        if key in image_paths
    ]
    return items[:limit]


def _file_name(image_id: str, source: Path, kind: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)
    return f"{safe}.{kind}{source.suffix.lower()}"


def thumbnail_jpeg(path: Path, side: int) -> bytes:
    """The image upright, within side x side, as JPEG bytes; decoded as every other reader decodes it."""
    thumbnail = open_rgb(path)
    thumbnail.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumbnail.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


def _data_uri(mime: str, content: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(content).decode('ascii')}"


def thumbnail_data_uri(path: Path, side: int) -> str:
    """The image as an embedded JPEG thumbnail within side x side, for pages that must stand alone."""
    return _data_uri("image/jpeg", thumbnail_jpeg(path, side))


def _image_source(path: Path, out_dir: Path, name: str, embed: bool, thumbnail_side: int | None = None) -> str:
    if embed and thumbnail_side:
        return _data_uri("image/jpeg", thumbnail_jpeg(path, thumbnail_side))
    if embed:
        return _data_uri(mimetypes.guess_type(path.name)[0] or "application/octet-stream", path.read_bytes())
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, out_dir / "images" / name)
    return f"images/{html.escape(name, quote=True)}"


def _row(item: GalleryItem, out_dir: Path, embed: bool, thumbnail_side: int | None) -> str:
    image = _image_source(item.image_path, out_dir, _file_name(item.image_id, item.image_path, "image"), embed,
                          thumbnail_side)
    references = "".join(f"<li>{html.escape(text)}</li>" for text in item.references)
    row = (
        f"<tr><td>{html.escape(item.image_id)}<br><img class=\"photo\" src=\"{image}\" "
        f"alt=\"{html.escape(item.image_id)}\"></td>"
        f"<td class=\"generated\">{html.escape(item.caption)}{_scores(item.scores)}</td>"
        f"<td><ul>{references}</ul></td></tr>"
    )
    if item.heatmap_path is not None:
        source = _image_source(item.heatmap_path, out_dir, _file_name(item.image_id, item.heatmap_path, "heatmap"),
                               embed)
        row += (f'\n<tr><td colspan="3"><img class="heatmap" src="{source}" '
                f'alt="attention of {html.escape(item.image_id)} for each caption token"></td></tr>')
    return row


def _scores(scores: dict[str, float]) -> str:
    """A caption's scores under it, e.g. "CLIP-S 0.712 · RefCLIP-S 0.655"; nothing without scores."""
    if not scores:
        return ""
    shown = " · ".join(f"{html.escape(name)} {value:.3f}" for name, value in scores.items())
    return f'<div class="scores">{shown}</div>'


def write_gallery(items: list[GalleryItem], out_dir: str | Path, title: str = "Generated captions",
                  embed_images: bool = False, thumbnail_side: int | None = None) -> Path:
    """Write out_dir/index.html (and out_dir/images/ unless embedding); returns the page's path.
    With `thumbnail_side`, embedded images are JPEG thumbnails within that many pixels a side."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = "\n".join(_row(item, out_dir, embed_images, thumbnail_side) for item in items)
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        "<table><tr><th>image</th><th>generated</th><th>references</th></tr>\n"
        f"{rows}\n</table></body></html>\n"
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path

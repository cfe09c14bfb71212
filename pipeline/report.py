"""An evaluated split on disk: captions, scores, the caption gallery and attention heatmaps.

    <out_dir>/captions.json    {image_id: generated caption}
    <out_dir>/metrics.json     the scores (by domain for NoCaps)
    <out_dir>/gallery/         index.html, one self-contained page (thumbnails and heatmaps embedded,
                               so it renders in MLflow's artifact viewer): image, caption, references
    <out_dir>/heatmaps/        <image_id>.png: attention over the image for each caption token
"""

from dataclasses import dataclass
from pathlib import Path

from ituning.evaluation import save_json
from ituning.heatmaps import render_heatmaps
from pipeline.gallery import gallery_items, write_gallery


GALLERY_THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class ReportFiles:
    captions: Path
    metrics: Path
    gallery: Path  # the folder holding index.html
    heatmaps: Path | None  # None when no heatmaps were asked for


def write_report(out_dir: str | Path, title: str, captions: dict[str, str], scores: dict,
                 references: dict[str, list[str]], image_paths: dict, captioner=None,
                 gallery_size: int | None = 100, heatmap_count: int = 8,
                 image_scores: dict[str, dict[str, float]] | None = None) -> ReportFiles:
    """Write the files above; heatmaps need the captioner and are drawn for the first images
    of the gallery, which shows them beside their captions, with each image's `image_scores`
    (e.g. its CLIP-S and RefCLIP-S)."""
    out_dir = Path(out_dir)
    heatmaps = {}
    if captioner is not None and heatmap_count > 0:
        heatmaps = render_heatmaps(captioner, image_paths, captions, out_dir / "heatmaps", heatmap_count)
    items = gallery_items(captions, references, image_paths, heatmaps, gallery_size, image_scores)
    gallery = write_gallery(items, out_dir / "gallery", title, embed_images=True,
                            thumbnail_side=GALLERY_THUMBNAIL_SIDE).parent
    return ReportFiles(
        captions=save_json(captions, out_dir / "captions.json"),
        metrics=save_json(scores, out_dir / "metrics.json"),
        gallery=gallery,
        heatmaps=out_dir / "heatmaps" if heatmaps else None,
    )

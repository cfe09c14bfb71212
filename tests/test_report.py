import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ituning.captioner import Captioner
from ituning.decoding import DecodingConfig
from ituning.evaluation import score_captions
from ituning.validation import evaluate_split
from pipeline.report import write_report
from pipeline.tracking import ExperimentTracker
from tests.scene_images import shape_image

SHAPES = {"21": ("red", "circle"), "22": ("blue", "square"), "23": ("yellow", "circle")}


@pytest.fixture(scope="module")
def split(standin_checkpoint, tmp_path_factory):
    """A tiny test split: image files, cached visual tokens and references."""
    captioner = Captioner.from_checkpoint(standin_checkpoint, device="cpu")
    folder = tmp_path_factory.mktemp("images")
    paths, cache = {}, {}
    for image_id, (colour, shape) in SHAPES.items():
        image = shape_image(colour, shape)
        paths[image_id] = folder / f"{image_id}.png"
        image.save(paths[image_id])
        with torch.inference_mode():
            cache[image_id] = captioner.vision(captioner.vision.preprocess(image)[None])[0].numpy().astype(np.float16)
    references = {key: [f"a {colour} {shape}", f"a {colour} {shape} in the middle"]
                  for key, (colour, shape) in SHAPES.items()}
    return captioner, paths, cache, references


def test_evaluated_split_is_reported_and_tracked(split, tmp_path):
    captioner, paths, cache, references = split
    decoding = DecodingConfig(num_beams=2, max_length=6)
    captions, scores = evaluate_split(captioner, cache, references, decoding=decoding, metrics=["BLEU-4", "CIDEr"])
    assert sorted(captions) == sorted(references)
    assert scores == score_captions(captions, references, ["BLEU-4", "CIDEr"])

    files = write_report(tmp_path / "report", "synthetic test", captions, scores, references, paths, captioner,
                         heatmap_count=2)
    assert json.loads(files.metrics.read_text()) == scores
    assert json.loads(files.captions.read_text()) == captions
    assert sorted(p.name for p in files.heatmaps.iterdir()) == ["21.png", "22.png"]
    page = (files.gallery / "index.html").read_text()
    assert page.count('class="heatmap"') == 2 and "a yellow circle in the middle" in page
    assert_self_contained(page, photos=len(captions), heatmaps=2)

    tracker = ExperimentTracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracker.pipeline_run("report") as parent, tracker.step_run(parent, "evaluate") as run_id:
        tracker.log_evaluation(run_id, "test", captions, scores, files.gallery, files.heatmaps)
    logged = {item.path for folder in ("gallery/test", "heatmaps/test")
              for item in tracker.client.list_artifacts(run_id, folder)}
    assert {"gallery/test/index.html", "heatmaps/test/21.png"} <= logged
    assert "gallery/test/images" not in logged  # nothing for the artifact viewer to resolve
    viewed = Path(tracker.client.download_artifacts(run_id, "gallery/test/index.html", str(tmp_path / "viewer")))
    assert_self_contained(viewed.read_text(), photos=len(captions), heatmaps=2)
    assert tracker.client.get_run(run_id).data.metrics["test/CIDEr"] == scores["CIDEr"]
    assert tracker.client.get_run(run_id).info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def assert_self_contained(page: str, photos: int, heatmaps: int):
    """Every image of the page is in the page: JPEG thumbnails of at most 256 px, PNG heatmaps."""
    sources = re.findall(r'<img class="(photo|heatmap)" src="([^"]+)"', page)
    assert [kind for kind, _ in sources].count("photo") == photos
    assert [kind for kind, _ in sources].count("heatmap") == heatmaps
    assert all(source.startswith("data:image/") for _, source in sources)
    for kind, source in sources:
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == ("JPEG" if kind == "photo" else "PNG")
            assert kind == "heatmap" or max(image.size) <= 256

"""The caption gallery as a user opens it: in the MLflow UI's artifact viewer, in a real browser.

The viewer shows an HTML artifact in a frame of its own page; relative image paths cannot resolve
there, so every picture of the gallery must be embedded. Chromium loads the real MLflow server's UI
(started as `make serve` starts it, once per test session) and each image of the gallery must have decoded.
"""

import time
from pathlib import Path

import pytest

from pipeline.gallery import gallery_items, write_gallery
from tests.browser import browser, open_page  # noqa: F401  (browser is a fixture)
from tests.scene_images import shape_image

pytestmark = pytest.mark.slow
DECODED_IMAGES = "Array.from(document.images).map(image => image.complete && image.naturalWidth > 0)"


@pytest.fixture
def tracking_server(mlflow_service, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_service.mlflow_url)
    return mlflow_service.mlflow_url


def logged_gallery(tmp_path: Path) -> tuple[str, str]:
    """(experiment id, run id) of a run that logged an embedded gallery with a heatmap, as evaluations log it."""
    from pipeline.tracking import ExperimentTracker

    images = {}
    for image_id, (colour, shape) in {"7": ("red", "circle"), "12": ("blue", "square")}.items():
        images[image_id] = tmp_path / f"{image_id}.png"
        shape_image(colour, shape, size=200).save(images[image_id])
    items = gallery_items({"7": "a red circle", "12": "a blue square"},
                          {"7": ["a red circle"], "12": ["a blue square on white"]}, images, {"7": images["12"]})
    gallery = write_gallery(items, tmp_path / "gallery", embed_images=True).parent
    tracker = ExperimentTracker()
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    tracker.log_evaluation(run_id, "coco_test", {"7": "a red circle", "12": "a blue square"}, {"CIDEr": 1.0}, gallery)
    tracker.client.set_terminated(run_id)
    return tracker.experiment_id, run_id


def gallery_frame(page, within_s: float = 120):
    """The frame in which the artifact viewer shows the gallery, once its images are in the document."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for frame in page.frames:
            if frame is not page.main_frame and frame.evaluate("document.images.length") >= 3:
                return frame
        page.wait_for_timeout(500)
    raise AssertionError(f"the MLflow UI showed no gallery frame with images; frames: {[f.url for f in page.frames]}")


def test_the_gallery_shows_its_images_inside_the_mlflow_ui(tracking_server, browser, tmp_path):  # noqa: F811
    experiment_id, run_id = logged_gallery(tmp_path)
    address = f"{tracking_server}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/gallery/coco_test/index.html"
    context, page, _script_errors = open_page(browser, address, width=1400, height=1000)  # the UI's own, not ours
    try:
        frame = gallery_frame(page)
        frame.wait_for_function(f"{DECODED_IMAGES}.every(Boolean)", timeout=60_000)
        decoded = frame.evaluate(DECODED_IMAGES)
        sources = frame.evaluate("Array.from(document.images).map(image => image.getAttribute('src').slice(0, 22))")
        assert len(decoded) == 3 and all(decoded)  # two thumbnails and one heatmap
        assert all(source.startswith("data:image/") for source in sources), sources
        assert "a blue square on white" in frame.inner_text("body")
    finally:
        context.close()

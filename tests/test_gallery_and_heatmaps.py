import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ituning.captioner import Captioner
from ituning.decoding import DecodingConfig
from pipeline.gallery import gallery_items, write_gallery
from ituning.heatmaps import caption_attention, patch_grid, save_heatmaps
from tests.scene_images import shape_image


@pytest.fixture(scope="module")
def captioner(standin_checkpoint):
    return Captioner.from_checkpoint(standin_checkpoint, device="cpu")


@pytest.fixture
def shape_files(tmp_path):
    paths = {}
    for image_id, (colour, shape) in {"7": ("red", "circle"), "12": ("blue", "square")}.items():
        paths[image_id] = tmp_path / f"{image_id}.png"
        shape_image(colour, shape).save(paths[image_id])
    return paths


def test_patch_grid_drops_the_class_token_and_keeps_patch_order():
    weights = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10)  # 1 class + 9 patches
    grid = patch_grid(weights)
    assert grid.shape == (2, 3, 3)
    assert grid[0, 0, 0] == 1 and grid[0, 0, 2] == 3 and grid[0, 1, 0] == 4 and grid[1, 2, 2] == 19
    with pytest.raises(ValueError, match="square"):
        patch_grid(torch.ones(1, 9))


def test_attention_maps_cover_the_patch_grid_per_token(captioner):
    image = shape_image("red", "circle")
    attention = caption_attention(captioner, image, "a red circle in the middle")
    assert "".join(attention.tokens).replace(" ", "") == "aredcircleinthemiddle"
    assert attention.maps.shape == (len(attention.tokens), 8, 8)  # 64 px / patch 8
    totals = attention.maps.sum(axis=(1, 2))  # the class token takes the rest of each row
    assert np.all(totals > 0) and np.all(totals < 1)
    assert all(layer.recorded_attention is None for layer in captioner.model.wrapped_layers.values())


def test_a_tokens_map_does_not_depend_on_later_tokens(captioner):
    image = shape_image("blue", "square")
    full = caption_attention(captioner, image, "a blue square in the middle")
    prefix = caption_attention(captioner, image, "a blue square")
    np.testing.assert_allclose(full.maps[: len(prefix.tokens)], prefix.maps, rtol=1e-5, atol=1e-6)
    other_image = caption_attention(captioner, shape_image("green", "circle"), "a blue square")
    assert not np.allclose(other_image.maps, prefix.maps)


def test_without_a_caption_the_generated_one_is_explained(captioner):
    image = shape_image("yellow", "square")
    decoding = DecodingConfig(num_beams=2, max_length=6)
    generated = caption_attention(captioner, image, decoding=decoding)
    assert generated.tokens, "the stand-in generated an empty caption"
    caption = captioner.caption_images([image], decoding)[0]
    assert "".join(generated.tokens).replace(" ", "") == caption.replace(" ", "")


def test_heatmap_png_has_a_panel_per_token(captioner, tmp_path):
    image = shape_image("green", "square")
    attention = caption_attention(captioner, image, "a green square in the middle")
    path = save_heatmaps(image, attention, tmp_path / "maps" / "12.png", columns=4)
    with Image.open(path) as png:
        assert png.format == "PNG"
        rows = -(-(len(attention.tokens) + 1) // 4)
        assert png.height > png.width * rows / 4 * 0.8  # rows of square panels


def test_gallery_copies_images_and_escapes_text(shape_files, tmp_path):
    captions = {"7": "a red <circle> & more", "12": "a blue square", "99": "no image file"}
    references = {"7": ["a red circle", "red disc"], "12": ["blue square"]}
    page = write_gallery(gallery_items(captions, references, shape_files), tmp_path / "gallery")
    text = page.read_text()
    assert "a red &lt;circle&gt; &amp; more" in text and "<circle>" not in text
    assert "<li>red disc</li>" in text and "no image file" not in text
    sources = re.findall(r'<img class="photo" src="([^"]+)"', text)
    assert len(sources) == 2
    assert all((page.parent / source).read_bytes() in {p.read_bytes() for p in shape_files.values()}
               for source in sources)
    assert text.index(">12<") < text.index(">7<")  # image_id order


def test_embedded_gallery_is_one_file(shape_files, tmp_path):
    heatmaps = {"7": shape_files["12"]}
    items = gallery_items({"7": "a red circle"}, {"7": ["a red circle"]}, shape_files, heatmaps)
    page = write_gallery(items, tmp_path / "one", embed_images=True)
    assert [p.name for p in page.parent.iterdir()] == ["index.html"]
    sources = re.findall(r'src="data:image/png;base64,([^"]+)"', page.read_text())
    assert [base64.b64decode(s) for s in sources] == [shape_files["7"].read_bytes(), shape_files["12"].read_bytes()]


def test_embedded_thumbnails_are_small_upright_jpegs(tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1000, 600), (200, 30, 30)).save(wide)
    items = gallery_items({"1": "a red picture"}, {}, {"1": wide})
    page = write_gallery(items, tmp_path / "thumbs", embed_images=True, thumbnail_side=256).read_text()
    [source] = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    with Image.open(io.BytesIO(base64.b64decode(source))) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == (256, 154)


def test_heatmaps_for_a_split_are_written_per_image(captioner, shape_files, tmp_path):
    from ituning.heatmaps import render_heatmaps

    captions = {"7": "a red circle", "12": "a blue square", "404": "an image without a file"}
    written = render_heatmaps(captioner, shape_files, captions, tmp_path / "heatmaps", limit=1)
    assert list(written) == ["12"] and written["12"] == tmp_path / "heatmaps" / "12.png"
    assert written["12"].is_file()

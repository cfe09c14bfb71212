import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from ituning.images import UnreadableImage, open_rgb
from tests.test_backbones import PAPER_COUNTS

runner = CliRunner()


def noise_image(mode="RGB", size=(48, 40)):
    channels = {"RGB": 3, "CMYK": 4, "L": None}[mode]
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8), mode)


@pytest.fixture
def image_files(tmp_path):
    good = tmp_path / "good.jpg"
    noise_image().save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not an image")
    png_named_jpg = tmp_path / "really_png.jpg"
    noise_image().save(png_named_jpg, format="PNG")
    return {"good": good, "truncated": truncated, "not_image": not_image,
            "missing": tmp_path / "missing.jpg", "png_named_jpg": png_named_jpg}


def test_unreadable_images_get_clear_reasons(image_files):
    for key, reason in [("truncated", "cannot decode"), ("not_image", "not an image"), ("missing", "no such file")]:
        with pytest.raises(UnreadableImage, match=reason):
            open_rgb(image_files[key])
    assert open_rgb(image_files["png_named_jpg"]).mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_are_converted_to_rgb(tmp_path, mode):
    path = tmp_path / f"{mode}.jpg"
    original = noise_image(mode)
    original.save(path, quality=100)
    converted = open_rgb(path)
    assert converted.mode == "RGB" and converted.size == original.size
    if mode == "L":
        channels = np.asarray(converted)
        assert (channels[..., 0] == channels[..., 1]).all() and (channels[..., 1] == channels[..., 2]).all()


@pytest.mark.parametrize("language_model, drop_first, expected", PAPER_COUNTS)
def test_params_command_prints_the_paper_counts(language_model, drop_first, expected):
    result = runner.invoke(app, ["params", "--lm", language_model, "--drop-first", str(drop_first)])
    assert result.exit_code == 0 and result.stdout.strip() == f"{expected:,}"


def test_params_command_rejects_an_unknown_model():
    result = runner.invoke(app, ["params", "--lm", "bert-base"])
    assert result.exit_code == 2 and "unknown language model 'bert-base'" in result.stderr


def test_caption_command_captions_good_files_and_names_bad_ones(standin_checkpoint, image_files):
    paths = [str(image_files[k]) for k in ("good", "truncated", "not_image", "missing", "png_named_jpg")]
    result = runner.invoke(app, ["caption", *paths, "--checkpoint", str(standin_checkpoint), "--beams", "3",
                                 "--max-length", "6", "--device", "cpu"])
    assert result.exit_code == 1
    captioned = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert captioned == [str(image_files["good"]), str(image_files["png_named_jpg"])]
    for key in ("truncated", "not_image", "missing"):
        assert f"error: {image_files[key]}:" in result.stderr


def test_caption_command_skips_an_image_over_the_pixel_limit(standin_checkpoint, image_files, tmp_path):
    from tests.test_image_decoding import HUGE_REASON, write_huge_png

    huge = write_huge_png(tmp_path / "huge.png")
    paths = [str(image_files["good"]), str(huge), str(image_files["png_named_jpg"])]
    result = runner.invoke(app, ["caption", *paths, "--checkpoint", str(standin_checkpoint), "--beams", "2",
                                 "--max-length", "4", "--device", "cpu", "--batch-size", "2"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [paths[0], paths[2]]
    assert [line for line in result.stderr.splitlines() if str(huge) in line] == [f"error: {huge}: {HUGE_REASON}"]
    assert "Traceback" not in result.stderr


def test_caption_command_reports_a_missing_checkpoint(tmp_path, image_files):
    result = runner.invoke(app, ["caption", str(image_files["good"]), "--checkpoint", str(tmp_path)])
    assert result.exit_code == 2 and "not an I-Tuning checkpoint" in result.stderr

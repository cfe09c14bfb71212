import json
import random

import numpy as np
import pytest

from ituning.images import open_rgb
from storage.image_check import inspect_image, inspect_images
from storage.jsonfields import MalformedInput
from storage.scenes import random_scene, render_scene
from storage.sources import read_karpathy, read_nocaps, read_visual_genome


def write(path, content):
    path.write_text(json.dumps(content))
    return path


def karpathy_image(**changes):
    image = {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "split": "restval",
             "sentences": [{"raw": " A cat. ", "sentid": 7}]}
    return {**image, **changes}


def test_karpathy_restval_joins_train_and_ids_are_text(tmp_path):
    records = read_karpathy(write(tmp_path / "dataset_coco.json", {"images": [karpathy_image()]}), "coco")
    row = records.images[0]
    assert (row.image_id, row.split, row.path) == ("42", "train", "val2014/COCO_val2014_000000000042.jpg")
    assert records.captions == [("42", "train", 7, "A cat.")]


@pytest.mark.parametrize("image, message", [
    (karpathy_image(split="dev"), r"images\[1\].split is 'dev'"),
    ({k: v for k, v in karpathy_image().items() if k != "cocoid"}, r"missing field images\[1\].cocoid"),
    (karpathy_image(cocoid=43, sentences=[{"tokens": []}]), r"missing field images\[1\].sentences\[0\].raw"),
    (karpathy_image(), r"images\[1\] repeats image id 42 in split train"),
    (karpathy_image(cocoid="42"), r"field images\[1\].cocoid must be int, not str"),
])
def test_malformed_karpathy_json_names_file_and_field(tmp_path, image, message):
    path = write(tmp_path / "dataset_coco.json", {"images": [karpathy_image(), image]})
    with pytest.raises(MalformedInput, match=f"dataset_coco.json: .*{message}"):
        read_karpathy(path, "coco")


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "image_data.json").write_text("[{")
    with pytest.raises(MalformedInput, match="image_data.json: not valid JSON"):
        read_visual_genome(tmp_path / "image_data.json", tmp_path / "regions.json", {})


def test_nocaps_domain_is_checked(tmp_path):
    info = write(tmp_path / "info.json", {"images": [{"id": 0, "file_name": "a.jpg", "domain": "far-domain"}]})
    with pytest.raises(MalformedInput, match=r"info.json: field images\[0\].domain is 'far-domain'"):
        read_nocaps(info, "val")


def test_cmyk_and_grayscale_jpegs_convert_to_the_right_colours(tmp_path):
    image = render_scene(random_scene(random.Random(5)), 96)
    for mode in ("CMYK", "L"):
        path = tmp_path / f"{mode}.jpg"
        image.convert(mode).save(path, quality=95)
        status, reason, width, height = inspect_image(path)
        assert (status, reason, width, height) == ("ok", f"{mode} image converted to RGB", 96, 96)
        reference = np.asarray(image.convert(mode).convert("RGB"), dtype=float)
        assert np.abs(np.asarray(open_rgb(path), dtype=float) - reference).mean() < 4
    cmyk = np.asarray(open_rgb(tmp_path / "CMYK.jpg"), dtype=float)
    assert np.abs(cmyk - np.asarray(image, dtype=float)).mean() < 12  # colours survive, not inverted


def test_parallel_image_check_equals_the_serial_one(tmp_path):
    image = render_scene(random_scene(random.Random(2)), 40)
    image.save(tmp_path / "ok.jpg")
    image.save(tmp_path / "named.jpg", format="PNG")
    (tmp_path / "text.jpg").write_text("not an image")
    paths = [tmp_path / name for name in ("ok.jpg", "named.jpg", "text.jpg", "absent.jpg")] * 3
    serial = inspect_images(paths, workers=1)
    assert inspect_images(paths, workers=2, parallel_from=1) == serial
    assert [status for status, *_ in serial[:4]] == ["ok", "ok", "unreadable", "missing"]

import json
import random

import numpy as np
import pytest

from ituning.images import open_rgb
from pipeline.small_corpus import read_karpathy_split
from pipeline.image_check import inspect_image, inspect_images
from storage.jsonfields import MalformedInput
from storage.scenes import random_scene, render_scene
from storage.datasets import AnnotationFiles, get_dataset
from storage.sources import COCO_LAYOUT, read_karpathy, read_nocaps, read_visual_genome


def write(path, content):
    path.write_text(json.dumps(content))
    return path


def karpathy_image(**changes):
    image = {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "split": "restval",
             "sentences": [{"raw": " A cat. ", "sentid": 7}]}
    return {**image, **changes}


def test_karpathy_restval_joins_train_and_ids_are_text(tmp_path):
    records = read_karpathy(write(tmp_path / "dataset_coco.json", {"images": [karpathy_image()]}), COCO_LAYOUT)
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
        read_karpathy(path, COCO_LAYOUT)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "image_data.json").write_text("[{")
    with pytest.raises(MalformedInput, match="image_data.json: not valid JSON"):
        read_visual_genome(tmp_path / "image_data.json", tmp_path / "regions.json", {})


def test_nocaps_domain_is_checked(tmp_path):
    info = write(tmp_path / "info.json", {"images": [{"id": 0, "file_name": "a.jpg", "domain": "far-domain"}]})
    with pytest.raises(MalformedInput, match=r"info.json: field images\[0\].domain is 'far-domain'"):
        read_nocaps(info, "val")
    captions = write(tmp_path / "captions.json", {"images": [{"id": 0, "domain": "far-domain"}], "annotations": []})
    with pytest.raises(MalformedInput, match=r"captions.json: field images\[0\].domain is 'far-domain'"):
        read_nocaps(write(tmp_path / "info.json", {"images": [{"id": 0, "file_name": "a.jpg"}]}), "val", captions)


def nocaps_image(image_id: int, **extra) -> dict:
    name = f"{image_id:016x}"
    return {"id": image_id, "open_images_id": name, "file_name": f"{name}.jpg", "height": 8, "width": 9,
            "coco_url": f"https://s3.amazonaws.com/nocaps/val/{name}.jpg", "license": 0, **extra}


def test_nocaps_domains_come_from_the_val_captions_images(tmp_path):
    info = write(tmp_path / "nocaps_val_image_info.json", {"images": [nocaps_image(i) for i in range(3)]})
    captions = write(tmp_path / "nocaps_val_4500_captions.json", {
        "images": [nocaps_image(0, domain="out-domain"), nocaps_image(1, domain="in-domain"), nocaps_image(2)],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A dog. "}]})
    records = read_nocaps(info, "val", captions)
    assert [(row.image_id, row.path, row.domain) for row in records.images] == [
        ("0", "val/0000000000000000.jpg", "out-domain"), ("1", "val/0000000000000001.jpg", "in-domain"),
        ("2", "val/0000000000000002.jpg", None)]
    assert records.captions == [("1", "val", 10, "A dog.")]
    assert [row.domain for row in read_nocaps(info, "val").images] == [None, None, None]
    both = write(tmp_path / "with_domain.json", {"images": [nocaps_image(0, domain="in-domain")]})
    with pytest.raises(MalformedInput, match=r"with_domain.json: images\[0\] \(image 0\) is in-domain, but "
                                             r".*nocaps_val_4500_captions.json says out-domain"):
        read_nocaps(both, "val", captions)


@pytest.mark.parametrize("folder", ["flickr30k-images/", ""])
def test_flickr30k_images_are_found_with_or_without_the_archive_folder(tmp_path, folder):
    entries = [{"filename": f"{1000 + n}.jpg", "imgid": n, "split": "train",
                "sentences": [{"raw": "A dog.", "sentid": n}]} for n in range(2)]
    karpathy_json = write(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": entries})
    root = tmp_path / "unpacked"
    for entry in entries:
        (root / folder).mkdir(parents=True, exist_ok=True)
        render_scene(random_scene(random.Random(0)), 16).save(root / folder / entry["filename"])
    images = read_karpathy_split(karpathy_json, root, "train")
    assert [(image.image_id, image.path) for image in images] == [
        (str(1000 + n), root / folder / f"{1000 + n}.jpg") for n in range(2)]
    found = get_dataset("flickr30k").read(AnnotationFiles(lambda pattern: karpathy_json, None))
    assert found.images[0].path == "flickr30k-images/1000.jpg"


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


@pytest.mark.parametrize("changes, message", [
    ({"filepath": "../.."}, r"images\[0\].filepath is '../..'; expected a path inside the data folder"),
    ({"filepath": "/home"}, r"images\[0\].filepath is '/home'"),
    ({"filepath": "C:\\data"}, r"images\[0\].filepath is 'C:\\\\data'"),
    ({"filename": "..\\..\\x.jpg"}, r"images\[0\].filename is"),
    ({"filename": "a\0.jpg"}, r"images\[0\].filename is"),
    ({"sentences": [{"raw": "a", "sentid": 1.5}]}, r"images\[0\].sentences\[0\].sentid must be int, not float"),
    ({"sentences": [{"raw": "a", "sentid": True}]}, r"images\[0\].sentences\[0\].sentid must be int, not bool"),
])
def test_karpathy_paths_stay_in_the_data_folder_and_ids_are_integers(tmp_path, changes, message):
    path = write(tmp_path / "dataset_coco.json", {"images": [karpathy_image(**changes)]})
    with pytest.raises(MalformedInput, match=f"dataset_coco.json: field {message}"):
        read_karpathy(path, COCO_LAYOUT)
    with pytest.raises(MalformedInput, match=f"dataset_coco.json: field {message}"):
        read_karpathy_split(path, tmp_path, "train")


def test_karpathy_split_reader_names_a_file_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "corpus.json", [karpathy_image()])
    with pytest.raises(MalformedInput, match="corpus.json: expected a JSON object at the top level, found list"):
        read_karpathy_split(path, tmp_path, "train")
    flickr = write(tmp_path / "flickr.json", {"images": [{"filename": "../1.jpg", "split": "train", "sentences": []}]})
    with pytest.raises(MalformedInput, match=r"flickr.json: field images\[0\].filename is '../1.jpg'"):
        read_karpathy_split(flickr, tmp_path, "train")


def vg_files(tmp_path, **changes):
    image = {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 8, "height": 8,
             "coco_id": None, **changes}
    regions = [{"id": 1, "regions": [{"region_id": 10, "phrase": "a cat"}]}]
    return write(tmp_path / "image_data.json", [image]), write(tmp_path / "region_descriptions.json", regions)


def test_visual_genome_paths_and_numbers_are_checked(tmp_path):
    assert read_visual_genome(*vg_files(tmp_path), {}).images[0].path == "VG_100K/1.jpg"
    assert read_visual_genome(*vg_files(tmp_path, url="https://host/1.jpg"), {}).images[0].path == "1.jpg"
    for url in ("https://host/VG_100K/..", "https://host/a/../.."):
        with pytest.raises(MalformedInput, match=r"image_data.json: field \[0\].url is .*inside the data folder"):
            read_visual_genome(*vg_files(tmp_path, url=url), {})
    with pytest.raises(MalformedInput, match=r"field \[0\].width must be int, not str"):
        read_visual_genome(*vg_files(tmp_path, width="8"), {})
    with pytest.raises(MalformedInput, match=r"field \[0\].height is 4294967296; expected an integer from 0"):
        read_visual_genome(*vg_files(tmp_path, height=2**32), {})
    with pytest.raises(MalformedInput, match=r"field \[0\].coco_id must be int, not str"):
        read_visual_genome(*vg_files(tmp_path, coco_id="12"), {})


def test_nocaps_file_names_and_sizes_are_checked(tmp_path):
    for name in ("../../x.jpg", "/etc/hostname"):
        info = write(tmp_path / "info.json", {"images": [nocaps_image(0, file_name=name)]})
        with pytest.raises(MalformedInput, match=rf"info.json: field images\[0\].file_name is '{name}'"):
            read_nocaps(info, "val")
    info = write(tmp_path / "info.json", {"images": [nocaps_image(0, width=-1)]})
    with pytest.raises(MalformedInput, match=r"info.json: field images\[0\].width is -1"):
        read_nocaps(info, "val")

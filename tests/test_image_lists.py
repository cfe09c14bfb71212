"""One image-list fingerprint for the catalog and the feature cache, however a path is spelled."""

from pathlib import Path

from storage.catalog import Catalog
from pipeline.features import image_list_fingerprint as feature_cache_fingerprint
from storage.image_lists import image_list_fingerprint, normalised_path
from pipeline.data import split_images
from storage.workspace import catalog_path


def real_and_linked_folder(tmp_path):
    """real/workspace/data/coco/train/{a,b}.jpg, and link/ a symlink to real/."""
    real = tmp_path / "real"
    (real / "workspace" / "data" / "coco" / "train").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (real / "workspace" / "data" / "coco" / "train" / name).write_bytes(b"jpeg")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    return real.resolve(), tmp_path / "link"


def test_a_path_spelled_several_ways_gives_one_fingerprint(tmp_path, monkeypatch):
    real, link = real_and_linked_folder(tmp_path)
    monkeypatch.chdir(real)
    plain = str(real / "workspace/data/coco/train/a.jpg")
    spellings = [
        plain,
        "workspace/data/coco/train/a.jpg",  # relative to the working directory
        "workspace/./data/coco/train/a.jpg",
        "workspace//data/coco/train//a.jpg",
        "workspace/data/coco/train/a.jpg/",
        "workspace/data/coco/../coco/train/a.jpg",
        str(link / "workspace/data/coco/train/a.jpg"),  # through a symlinked folder
        f"{link}/workspace/./data/coco/train/a.jpg",
    ]
    assert [normalised_path(spelling) for spelling in spellings] == [plain] * len(spellings)
    expected = image_list_fingerprint([("1", plain)])
    assert [feature_cache_fingerprint([("1", spelling)]) for spelling in spellings] == [expected] * len(spellings)
    assert image_list_fingerprint([("1", "data/coco/train/a.jpg")], base=link / "workspace") == expected
    assert image_list_fingerprint([("1", plain.replace("a.jpg", "b.jpg"))]) != expected
    assert image_list_fingerprint([("2", plain)]) != expected


def catalog_with_paths(workspace, paths: dict[str, str]) -> None:
    with Catalog(catalog_path(workspace)) as catalog:
        catalog.replace_dataset("coco", {
            "image_id": list(paths), "split": ["train"] * len(paths), "path": list(paths.values()),
            "width": [8] * len(paths), "height": [8] * len(paths), "domain": [None] * len(paths),
            "status": ["ok"] * len(paths), "reason": [None] * len(paths)},
            {"image_id": [], "caption_id": [], "text": [], "split": []}, 0)


def test_the_catalog_and_the_feature_cache_agree_on_paths_that_need_normalising(tmp_path, monkeypatch):
    real, link = real_and_linked_folder(tmp_path)
    linked_workspace = link / "workspace"
    catalog_with_paths(linked_workspace, {
        "a": f"{linked_workspace}/data/./coco/train/a.jpg",  # absolute, through the link, with a dot
        "b": "data/coco/train/b.jpg",  # relative to the workspace
    })
    plain = [(name, real / f"workspace/data/coco/train/{name}.jpg") for name in ("a", "b")]
    monkeypatch.chdir(link)
    for workspace in (linked_workspace, real / "workspace", Path("workspace")):  # however the workspace is named
        with Catalog(catalog_path(workspace), read_only=True) as catalog:
            from_catalog = catalog.image_list_fingerprint("coco", "train")
        # the cache names the workspace's images relative to it, as the catalog does
        assert from_catalog == feature_cache_fingerprint(split_images(workspace, "coco", "train"), root=workspace)
        assert from_catalog == feature_cache_fingerprint(plain, root=real / "workspace")

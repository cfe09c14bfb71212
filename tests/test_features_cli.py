"""`ituning features` and `ituning features verify` over a real catalog of the synthetic corpus."""

from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from ituning.backbones import BackboneSpec
from ituning.cli import app
from ituning.standins import save_vision_standin
from storage.acquire import download_dataset
from storage.catalog import Catalog
from storage.catalog_build import build_dataset
from storage.feature_shards import EncodeSettings
from storage.features import ENTRY_NAME, FeatureReader, split_cache_dir
from storage.manifests import load_manifest
from storage.synthetic import write_corpus
from storage.workspace import catalog_path


@pytest.fixture
def workspace(tmp_path) -> Path:
    """COCO of the synthetic corpus, downloaded and catalogued; its last usable training image is
    damaged after cataloguing, so encoding finds it unreadable."""
    root = tmp_path / "workspace"
    corpus = write_corpus(tmp_path / "corpus", 15, seed=1)
    download_dataset(load_manifest(corpus.manifests["coco"]), root)
    with Catalog(catalog_path(root)) as catalog:
        build_dataset(root, "coco", catalog, workers=1)
        usable = catalog.usable_images("coco", "train")
    assert len(usable) == 6
    usable[-1].path.write_bytes(b"not a jpeg")
    return root


def test_features_command_builds_by_parts_then_verifies(workspace):
    vision = save_vision_standin(workspace / "vision", seed=0)
    common = ["--dataset", "coco", "--split", "train", "--workspace", str(workspace), "--vision", vision,
              "--vision-pretrained", "none"]
    build = ["features", *common, "--device", "cpu", "--batch-size", "2", "--workers", "0", "--shard-size", "2"]
    runner = CliRunner()
    half = runner.invoke(app, [*build, "--part", "1/2"])
    assert half.exit_code == 0, half.output
    assert "shards encoded [1], reused []" in half.output and "still missing" in half.output
    whole = runner.invoke(app, build)
    assert whole.exit_code == 0, whole.output
    assert "6 usable images; shards encoded [0, 2], reused [1]" in whole.output
    assert "1 unreadable image(s) skipped" in whole.output and "unreadable: " in whole.output
    cache = split_cache_dir(workspace, "coco", "train", BackboneSpec(vision, None), EncodeSettings(device="cpu"))
    assert cache.name == "float32-float16"
    with Catalog(catalog_path(workspace), read_only=True) as catalog:
        usable_ids = [image.image_id for image in catalog.usable_images("coco", "train")]
    assert FeatureReader(cache / ENTRY_NAME).image_ids == usable_ids[:-1]

    verified = runner.invoke(app, ["features", "verify", *common, "--device", "cpu"])
    assert verified.exit_code == 0 and "5 rows for 6 usable images; 1 unreadable" in verified.output
    assert f"cache: {cache}\n" in verified.output
    with h5py.File(cache / "shard-00000.h5", "r+") as handle:
        handle["tokens"][0, 0, 0] = np.inf
    damaged = runner.invoke(app, ["features", "verify", *common])
    assert damaged.exit_code == 1 and f"NaN or Inf in 1 row(s): ['{usable_ids[0]}']" in damaged.output


@pytest.mark.parametrize("part", ["4/4", "5/4", "a/b", "1/0", "1/4/2", "-1/4", ""])
def test_a_bad_part_is_a_one_line_usage_error(part, tmp_path):
    result = CliRunner().invoke(app, ["features", "--dataset", "coco", "--split", "train", "--workspace",
                                      str(tmp_path), "--part", part])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "Invalid value for '--part'" in line]
    assert len(errors) == 1 and f"{part!r} is not I/N with 0 <= I < N" in errors[0], result.output


def test_a_missing_split_is_an_error():
    result = CliRunner().invoke(app, ["features", "verify", "--dataset", "coco"])
    assert result.exit_code == 2 and "--dataset and --split are required" in result.output

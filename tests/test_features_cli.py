"""`ituning features` and `ituning features verify` over a catalog of rendered images.

The catalog here is a stand-in with the contract's `usable_images` (storage/catalog.py is the
datasets area's): the commands must only rely on that method."""

import random
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from ituning.backbones import BackboneSpec
from ituning.cli import app
from ituning.standins import save_vision_standin
from storage.features import ENTRY_NAME, FeatureReader, split_cache_dir
from storage.scenes import random_scene, render_scene


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    rng, images = random.Random(1), []
    (tmp_path / "data").mkdir()
    for index in range(7):
        relative = Path("data") / f"{index}.jpg"
        render_scene(random_scene(rng), size=72).save(tmp_path / relative)
        images.append(SimpleNamespace(image_id=str(index), path=relative))
    (tmp_path / "data" / "7.jpg").write_bytes(b"not a jpeg")
    images.append(SimpleNamespace(image_id="7", path=Path("data/7.jpg")))

    class ListCatalog:
        def __init__(self, path: Path, read_only: bool = False):
            assert path == tmp_path / "catalog.duckdb" and read_only

        def usable_images(self, dataset: str, split: str):
            assert (dataset, split) == ("coco", "val")
            return images

    monkeypatch.setitem(sys.modules, "storage.catalog", types.SimpleNamespace(Catalog=ListCatalog))
    try:
        import storage.workspace  # noqa: F401
    except ImportError:
        fake = types.SimpleNamespace(workspace_root=lambda override=None: Path(override))
        monkeypatch.setitem(sys.modules, "storage.workspace", fake)
    return tmp_path


def test_features_command_builds_by_parts_then_verifies(workspace):
    vision = save_vision_standin(workspace / "vision", seed=0)
    common = ["--dataset", "coco", "--split", "val", "--workspace", str(workspace), "--vision", vision,
              "--vision-pretrained", "none"]
    build = ["features", *common, "--device", "cpu", "--batch-size", "2", "--workers", "0", "--shard-size", "3"]
    runner = CliRunner()
    half = runner.invoke(app, [*build, "--part", "1/2"])
    assert half.exit_code == 0, half.output
    assert "shards encoded [1], reused []" in half.output and "still missing" in half.output
    whole = runner.invoke(app, build)
    assert whole.exit_code == 0, whole.output
    assert "8 usable images; shards encoded [0, 2], reused [1]" in whole.output
    assert "1 unreadable image(s) skipped" in whole.output and "unreadable: 7:" in whole.output
    cache = split_cache_dir(workspace, "coco", "val", BackboneSpec(vision, None))
    assert FeatureReader(cache / ENTRY_NAME).image_ids == [str(index) for index in range(7)]

    verified = runner.invoke(app, ["features", "verify", *common])
    assert verified.exit_code == 0 and "7 rows for 8 usable images; 1 unreadable" in verified.output
    with h5py.File(cache / "shard-00000.h5", "r+") as handle:
        handle["tokens"][0, 0, 0] = np.inf
    damaged = runner.invoke(app, ["features", "verify", *common])
    assert damaged.exit_code == 1 and "NaN or Inf in 1 row(s): ['0']" in damaged.output


def test_features_command_rejects_a_bad_part_or_a_missing_split(workspace):
    result = CliRunner().invoke(app, ["features", "--dataset", "coco", "--split", "val", "--workspace",
                                      str(workspace), "--part", "2/2"])
    assert result.exit_code == 2 and "--part must be I/N" in result.output
    result = CliRunner().invoke(app, ["features", "verify", "--dataset", "coco"])
    assert result.exit_code == 2 and "--dataset and --split are required" in result.output

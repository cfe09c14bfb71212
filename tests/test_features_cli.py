"""`ituning features` and `ituning features verify` over a real catalog of the synthetic corpus."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from ituning.backbones import BackboneSpec
from cli.main import app
from ituning.standins import save_vision_standin
from storage.acquire import download_dataset
from storage.catalog import Catalog
from pipeline.data import build_dataset
from ituning.encoding import EncodeSettings
from pipeline.features import split_cache_dir
from storage.feature_cache import ENTRY_NAME, FeatureReader
from storage.manifests import load_manifest
from storage.synthetic import write_corpus
from storage.workspace import catalog_path
from tests.shard_damage import overwrite_tokens_in_place, truncate


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


def test_verify_names_damaged_shards_and_the_build_encodes_them_again(workspace):
    vision = save_vision_standin(workspace / "vision", seed=0)
    common = ["--dataset", "coco", "--split", "train", "--workspace", str(workspace), "--vision", vision,
              "--vision-pretrained", "none", "--device", "cpu"]
    build = ["features", *common, "--batch-size", "2", "--workers", "0", "--shard-size", "2"]
    runner = CliRunner()
    assert runner.invoke(app, build).exit_code == 0
    cache = split_cache_dir(workspace, "coco", "train", BackboneSpec(vision, None), EncodeSettings(device="cpu"))
    truncate(cache / "shard-00001.h5")
    overwrite_tokens_in_place(cache / "shard-00002.h5", row=0)
    damaged = runner.invoke(app, ["features", "verify", *common])
    assert damaged.exit_code == 1 and isinstance(damaged.exception, SystemExit), damaged.output  # no traceback
    problems = [line for line in damaged.output.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 2, damaged.output
    assert problems[0].startswith("problem: shard-00001.h5: cannot be read (Unable to synchronously open file")
    assert problems[1] == "problem: shard-00002.h5: checksum mismatch: its bytes changed after it was written"
    assert f"ituning features --dataset coco --split train --workspace {workspace} --vision {vision}" in damaged.output
    rebuilt = runner.invoke(app, build)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "damaged: shard-00001.h5: cannot be read" in rebuilt.output
    assert "damaged: shard-00002.h5: checksum mismatch" in rebuilt.output
    assert "shards encoded [1, 2], reused [0]" in rebuilt.output and "entry point: " in rebuilt.output
    verified = runner.invoke(app, ["features", "verify", *common])
    assert verified.exit_code == 0 and verified.output.endswith("ok\n"), verified.output


@pytest.mark.slow
def test_training_on_a_truncated_shard_names_it_and_the_command_that_rebuilds_it(workspace, standin_backbones,
                                                                                 monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    config = workspace / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "truncated", "device": "cpu",
        "model": {"vision_model": standin_backbones.vision_model, "vision_pretrained": None,
                  "language_model": standin_backbones.language_model},
        "stages": [{"name": "finetune", "dataset": "coco", "epochs": 1, "batch_size": 4, "micro_batch_size": 4,
                    "precision": "fp32", "val_split": None}]}))
    vision = standin_backbones.vision_model
    runner = CliRunner()
    built = runner.invoke(app, ["features", "--dataset", "coco", "--split", "train", "--workspace", str(workspace),
                                "--vision", vision, "--vision-pretrained", "none", "--device", "cpu",
                                "--workers", "0", "--shard-size", "2"])
    assert built.exit_code == 0, built.output
    cache = split_cache_dir(workspace, "coco", "train", BackboneSpec(vision, None), EncodeSettings(device="cpu"))
    truncate(cache / "shard-00000.h5")
    result = runner.invoke(app, ["train", "--config", str(config), "--workspace", str(workspace), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {cache / 'shard-00000.h5'}: cannot read"), result.output
    assert "ituning features --dataset coco --split train" in errors[0] and "Traceback" not in result.output


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


def test_decoding_on_the_device_is_a_choice_of_three(tmp_path):
    result = CliRunner().invoke(app, ["features", "--dataset", "coco", "--split", "train", "--workspace",
                                      str(tmp_path), "--decode-on-device", "sometimes"])
    assert result.exit_code == 2, result.output
    assert "unknown --decode-on-device 'sometimes': expected auto, never, always" in result.output
    assert "--decode-on-device" in CliRunner().invoke(app, ["features", "--help"]).output

"""Flickr8k through `ituning pipeline`, as a user runs it: the demo with its fine-tuning stage on
Flickr8k, in a subprocess, on a copy of the session's demo workspace (tests/flow_fixtures.py) so
COCO's download (the stand-in backbones learn from it) is reused. The synthetic corpus holds Flickr8k in its published format
(storage/datasets/flickr8k.py), so the run downloads, catalogues, caches, trains and evaluates it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from storage.catalog import Catalog
from storage.feature_cache import FeatureReader
from storage.workspace import catalog_path
from tests.flow_fixtures import SMALL_RUN

ROOT = Path(__file__).resolve().parent.parent
ITUNING = str(Path(sys.executable).parent / "ituning")
STEP_LINE = re.compile(r"^  ([^\t\n]+?) +(ran|reused)\b", re.MULTILINE)  # "  finetune   ran     run <id>"
FLICKR8K_STAGE = ["--set", "name=demo-flickr8k", "--set", "stages[0].dataset=flickr8k", "--set", "stages[0].epochs=2",
                  "--register-as", "ituning-demo-flickr8k"]


def run_pipeline(workspace: Path, *extra: str) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PREFECT_", "MLFLOW_TRACKING_URI", "ITUNING_WORKSPACE"))}
    options = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL_RUN.items()]
    result = subprocess.run([ITUNING, "pipeline", *options, *extra, "--workspace", str(workspace)], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the session's demo run may start here, then this run
def test_flickr8k_downloads_catalogues_caches_trains_and_evaluates(demo_workspace_copy):
    workspace = demo_workspace_copy

    run = run_pipeline(workspace, *FLICKR8K_STAGE)

    states = dict(STEP_LINE.findall(run.stdout))
    assert {name: states.get(name) for name in ("download flickr8k", "features flickr8k/train", "finetune",
                                                 "evaluate flickr8k/test")} == dict.fromkeys(
        ("download flickr8k", "features flickr8k/train", "finetune", "evaluate flickr8k/test"), "ran"), run.stdout
    usable = check_the_catalog(workspace)
    check_the_feature_cache(workspace, usable)
    config = json.loads((workspace / "runs/demo-flickr8k/config.json").read_text())
    assert [stage["dataset"] for stage in config["stages"]] == ["flickr8k"]
    assert (workspace / "runs/demo-flickr8k/finetune/final/adapter_model.safetensors").is_file()
    [metrics_file] = workspace.glob("evaluations/*/flickr8k-test/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())
    assert re.search(r"^  CIDEr +\d", run.stdout, re.MULTILINE), run.stdout


def check_the_catalog(workspace: Path) -> dict[str, list[str]]:
    """Flickr8k's rows: every synthetic image in its split, five captions each, the images where its
    archive unpacks them, the build marked synthetic. Returns the usable image ids by split."""
    with Catalog(catalog_path(workspace), read_only=True) as catalog:
        usable = {split: sorted(image.image_id for image in catalog.usable_images("flickr8k", split))
                  for split in ("train", "val", "test")}
        assert all(usable.values()) and sum(map(len, usable.values())) == SMALL_RUN["synthetic_images"]
        for split, ids in usable.items():
            assert {len(texts) for texts in catalog.captions("flickr8k", split).values()} == {5}
            assert sorted(catalog.captions("flickr8k", split)) == ids
        _, paths = catalog.query("SELECT path FROM images WHERE dataset = 'flickr8k'")
        assert all(path.startswith("data/flickr8k/Flicker8k_Dataset/") for path, in paths)
        _, builds = catalog.query("SELECT synthetic FROM builds WHERE dataset = 'flickr8k'")
        assert builds == [(True,)]
    return usable


def check_the_feature_cache(workspace: Path, usable: dict[str, list[str]]) -> None:
    for split, ids in usable.items():
        [entry] = (workspace / "features" / "flickr8k" / split).glob("*/*/features.json")
        with FeatureReader(entry) as reader:
            assert sorted(reader) == ids
            assert reader[ids[0]].ndim == 2  # one image's visual tokens

"""Each fast path that fails its first-use check falls back as a user meets it: `ituning features`,
`ituning train` and `ituning evaluate` in a subprocess finish on the plain path with the result of a
run with the path off, print one warning line per path, and the MLflow runs carry `fallback.<path>`.

The fast paths run on CUDA only (nvJPEG, CUDA graphs, the memory probe) or are off on the CPU by
default, so the subprocesses get the test-only fault-injection point of ituning/fault_injection.py:
ITUNING_TEST_FAULTS names the paths that `auto` takes as available here and whose check fails. The
reference runs are in-process, with the paths off.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from ituning.backbones import BackboneSpec
from ituning.checkpoint import WEIGHTS_FILE
from ituning.config import EvaluationSettings
from ituning.encoding import EncodeSettings
from ituning.fault_injection import FAULTS_VARIABLE
from pipeline import data, evaluation, features, training
from pipeline.tracking import ExperimentTracker
from storage.feature_cache import FeatureReader

ITUNING = Path(sys.executable).with_name("ituning")
STAGE = {"name": "finetune", "dataset": "coco", "epochs": 1, "batch_size": 8, "precision": "fp32",
         "val_images": 4, "val_beams": 2, "val_max_length": 6, "seed": 3, "captions": "random"}
PATHS_OFF = {"compile": False, "data_on_device": False, "micro_batch_size": 8}
PATHS_AUTO = {"compile": "auto", "data_on_device": "auto", "micro_batch_size": "auto"}
TRAINING_PATHS = ("compile", "data_on_device", "micro_batch", "static_decoding")


def write_config(path: Path, **stage) -> Path:
    path.write_text(yaml.safe_dump({
        "name": path.stem, "device": "cpu",
        "model": {"vision_model": "local-dir:backbones/vision", "vision_pretrained": None,
                  "language_model": "backbones/language"},
        "evaluation": {"clip_score_model": None},
        "stages": [{**STAGE, **stage}]}))
    return path


def ituning(workspace: Path, faults: tuple[str, ...], *arguments: str) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_TRACKING")}
    environment.update({FAULTS_VARIABLE: ",".join(faults), "ITUNING_WORKSPACE": str(workspace)})
    done = subprocess.run([ITUNING, *arguments], capture_output=True, text=True, env=environment, cwd=workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def warnings_of(done: subprocess.CompletedProcess, path: str) -> list[str]:
    return [line for line in done.stderr.splitlines() if f"({path}) fell back to the plain path" in line]


def run_id_of(output: str) -> str:
    return output.rsplit("(MLflow run ", 1)[1].split(")")[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A catalog, stand-in backbones and the train and val feature caches; a stage trained in-process
    with every fast path off (the reference)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        root = tmp_path_factory.mktemp("fallbacks")
        manifests = data.write_demo_corpus(root, images=30, seed=1)
        data.download(root, "coco", manifests["coco"])
        data.build_catalog(root, ["coco"])
        backbones = data.build_demo_backbones(root, vision_steps=2, language_steps=2, batch_size=16)
        for split in ("train", "val"):
            features.finish_feature_cache(root, "coco", split, backbones, 1024, "cpu")
        reference = training.train_stage(root, str(write_config(root / "off.yaml", **PATHS_OFF)), "finetune",
                                         device="cpu", progress=False)
        yield {"root": root, "backbones": backbones, "reference": reference}


@pytest.mark.slow
def test_features_fall_back_to_decoding_on_the_cpu(workspace):
    root, backbones = workspace["root"], workspace["backbones"]
    done = ituning(root, ("device_decoding",), "features", "--dataset", "coco", "--split", "test", "--device", "cpu",
                   "--vision", backbones["vision_model"], "--vision-pretrained", "none", "--workers", "0")
    assert len(warnings_of(done, "device_decoding")) == 1 and "InjectedFault" in done.stderr
    entry = Path(done.stdout.split("entry point: ")[1].strip())
    reference = features.encode_features(
        data.split_images(root, "coco", "test"), BackboneSpec(**backbones), root / "reference-test",
        features.FeatureSettings(1024, EncodeSettings(device="cpu", num_workers=0, decode_on_device="never")))
    decoded_on_device, decoded_on_cpu = FeatureReader(entry), FeatureReader(reference.entry)
    assert sorted(decoded_on_device.image_ids) == sorted(decoded_on_cpu.image_ids)
    for image_id in decoded_on_cpu.image_ids:
        np.testing.assert_array_equal(np.asarray(decoded_on_device[image_id]), np.asarray(decoded_on_cpu[image_id]))


@pytest.mark.slow
def test_training_falls_back_from_every_fast_path_to_the_result_with_them_off(workspace):
    root, reference = workspace["root"], workspace["reference"]
    config = write_config(root / "auto.yaml", **PATHS_AUTO)
    done = ituning(root, TRAINING_PATHS, "train", "--config", str(config), "--device", "cpu")
    for path in TRAINING_PATHS:
        assert len(warnings_of(done, path)) == 1, done.stderr[-3000:]
    checkpoint = Path(done.stdout.split("finetune: modules at ")[1].split(",")[0].split(" (")[0])
    expected = Path(reference["checkpoint"])
    assert json.loads((checkpoint / "metrics.json").read_text()) == json.loads((expected / "metrics.json").read_text())
    trained, trained_off = load_file(checkpoint / WEIGHTS_FILE), load_file(expected / WEIGHTS_FILE)
    assert trained.keys() == trained_off.keys()
    for name in trained:
        np.testing.assert_array_equal(trained[name], trained_off[name])
    tags = ExperimentTracker(workspace=root).client.get_run(run_id_of(done.stdout)).data.tags
    for path in TRAINING_PATHS:
        assert "InjectedFault" in tags[f"fallback.{path}"] and tags[f"fast_path.{path}"] == "fallback"
    assert tags["plan.finetune.micro_batch_size"] == "8" and tags["plan.finetune.data_on_device"] == "False"
    assert tags["plan.finetune.compiled"] == "False"


@pytest.mark.slow
def test_evaluation_falls_back_to_the_cached_decoding_step(workspace):
    root, checkpoint = workspace["root"], workspace["reference"]["checkpoint"]
    done = ituning(root, ("static_decoding",), "evaluate", "--checkpoint", checkpoint, "--split", "test",
                   "--beams", "2", "--device", "cpu", "--clip-model", "none")
    assert len(warnings_of(done, "static_decoding")) == 1
    expected = evaluation.evaluate(root, checkpoint, "coco", "test", device="cpu", num_beams=2, gallery_size=1,
                                   scoring=EvaluationSettings(clip_score_model=None))
    assert json.loads(done.stdout.split("\ncaptions: ")[0]) == expected["metrics"]
    captions = Path(done.stdout.split("\ncaptions: ")[1].split(" (MLflow run")[0])
    assert json.loads(captions.read_text()) == json.loads(Path(expected["captions_path"]).read_text())
    tracker = ExperimentTracker(workspace=root)
    tags = tracker.client.get_run(run_id_of(done.stdout)).data.tags
    assert "InjectedFault" in tags["fallback.static_decoding"]
    assert "fallback.static_decoding" not in tracker.client.get_run(expected["run_id"]).data.tags

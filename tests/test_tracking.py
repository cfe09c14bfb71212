import json
import os
import shutil
from dataclasses import dataclass

import pytest
from mlflow.artifacts import download_artifacts

from ituning.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ituning.version import code_version
from pipeline.tracking import PARENT_TAG, STAGE_TAG, ExperimentTracker, flatten, flatten_metrics, tracking_uri


@dataclass(frozen=True)
class Optimiser:
    learning_rate: float = 1e-4
    betas: tuple = (0.9, 0.999)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="module")
def tracker(workspace):
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield ExperimentTracker(workspace=workspace)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved


def test_flatten_resolves_nested_config():
    config = {"train": {"optimiser": Optimiser(), "epochs": 30, "layers": [1, 2]}, "name": "coco"}
    assert flatten(config) == {
        "train.optimiser.learning_rate": "0.0001", "train.optimiser.betas": "[0.9, 0.999]",
        "train.epochs": "30", "train.layers": "[1, 2]", "name": "coco",
    }
    assert flatten_metrics({"in-domain": {"CIDEr": 0.5}, "overall": {"CIDEr": 0.7}}, "nocaps_val") == {
        "nocaps_val/in-domain/CIDEr": 0.5, "nocaps_val/overall/CIDEr": 0.7}


def test_default_store_is_sqlite_in_the_workspace_unless_a_uri_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_a_fluent_block_leaves_mlflows_defaults_unset(tracker, tmp_path, monkeypatch):
    """After the block, a client given only a tracking URI finds its registry in that store, not in an
    ./mlflow.db of the working folder (the registry list of the web page once emptied so)."""
    from mlflow import MlflowClient

    from pipeline.tracking import fluent_store

    monkeypatch.chdir(tmp_path)
    with fluent_store(tracker.uri):
        pass
    tracker.client.create_registered_model("kept-in-the-workspace")
    try:
        names = [model.name for model in MlflowClient(tracking_uri=tracker.uri).search_registered_models()]
        assert "kept-in-the-workspace" in names
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        tracker.client.delete_registered_model("kept-in-the-workspace")


def test_pipeline_run_has_a_child_run_per_stage(tracker, workspace):
    config = {"model": {"language_model": "gpt2", "drop_first": 0}, "stages": ["pretrain", "finetune"]}
    with tracker.pipeline_run("coco-gpt2", config, seed=7) as parent:
        with tracker.step_run(parent, "pretrain", {"epochs": 10}, stage="pretrain") as pretrain:
            pass
        with pytest.raises(RuntimeError), tracker.step_run(parent, "finetune", {"epochs": 30}, stage="finetune") as finetune:
            raise RuntimeError("loss is NaN")
    runs = {run_id: tracker.client.get_run(run_id) for run_id in (parent, pretrain, finetune)}
    assert runs[parent].data.params == {"model.language_model": "gpt2", "model.drop_first": "0",
                                        "stages": '["pretrain", "finetune"]', "seed": "7",
                                        "code_version": code_version()}
    assert [runs[r].data.tags.get(PARENT_TAG) for r in (pretrain, finetune)] == [parent, parent]
    assert runs[finetune].data.tags[STAGE_TAG] == "finetune" and runs[finetune].data.params["epochs"] == "30"
    assert [runs[r].info.status for r in (parent, pretrain, finetune)] == ["FINISHED", "FINISHED", "FAILED"]
    assert (workspace / "mlflow.db").is_file()
    assert runs[parent].info.artifact_uri.startswith((workspace / "mlartifacts").resolve().as_uri())


def test_training_callbacks_log_steps_epochs_and_module_weights(tracker, standin_checkpoint, tmp_path):
    checkpoint = tmp_path / "last"
    shutil.copytree(standin_checkpoint, checkpoint)
    (checkpoint / "optimizer.pt").write_bytes(b"resume state, not a deliverable")
    with tracker.pipeline_run("callbacks") as parent, tracker.step_run(parent, "finetune") as run_id:
        callbacks = tracker.callbacks(run_id, log_every=2)
        for step in range(5):
            callbacks.on_step(step, {"loss": 5.0 - step, "learning_rate": 1e-4 * step})
        callbacks.on_epoch(0, {"val_CIDEr": 0.25})
        callbacks.on_epoch(1, {"val_CIDEr": 0.5})
        callbacks.on_plan("finetune", {"micro_batch_size": 256, "data_on_device": True, "compiled": True})
        callbacks.on_plan("finetune", {"micro_batch_size": 128, "data_on_device": True, "compiled": True})  # resumed
        callbacks.on_checkpoint(checkpoint)
    history = tracker.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 5.0), (2, 3.0), (4, 1.0)]
    epochs = tracker.client.get_metric_history(run_id, "epoch/val_CIDEr")
    assert [(m.step, m.value) for m in epochs] == [(0, 0.25), (1, 0.5)]
    files = {item.path for item in tracker.client.list_artifacts(run_id, "checkpoints/last")}
    assert files == {f"checkpoints/last/{WEIGHTS_FILE}", f"checkpoints/last/{CONFIG_FILE}"}
    params = tracker.client.get_run(run_id).data.params
    adapter = json.loads((standin_checkpoint / CONFIG_FILE).read_text())
    assert params["adapter.ituning.scale"] == str(adapter["ituning"]["scale"])
    assert params["adapter.code_version"] == adapter["code_version"]
    tags = tracker.client.get_run(run_id).data.tags
    assert (tags["plan.finetune.micro_batch_size"], tags["plan.finetune.data_on_device"]) == ("128", "True")


def test_dataset_inputs_show_what_a_run_read(tracker, workspace):
    fingerprint = "0123456789abcdef" * 4
    with tracker.pipeline_run("data") as parent, tracker.step_run(parent, "finetune") as run_id:
        tracker.log_dataset(run_id, "coco/train", fingerprint, workspace / "catalog.duckdb", "training", images=113287)
        tracker.log_dataset(run_id, "coco/val", fingerprint[::-1], workspace / "catalog.duckdb", "validation")
    inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    seen = {(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in inputs}
    assert seen == {("coco/train", fingerprint[:16], "training"), ("coco/val", fingerprint[::-1][:16], "validation")}
    assert json.loads(next(i for i in inputs if i.dataset.name == "coco/train").dataset.profile) == {"images": 113287}
    assert tracker.client.get_run(run_id).data.params["data.training.coco/train.fingerprint"] == fingerprint


def test_evaluation_artifacts_and_metrics(tracker, tmp_path):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    (gallery / "index.html").write_text("<html></html>")
    scores = {"in-domain": {"CIDEr": 0.8, "BLEU-4": 0.3}, "overall": {"CIDEr": 0.6, "BLEU-4": 0.25}}
    captions = {"2": "a cat", "1": "a dog"}
    with tracker.pipeline_run("eval") as parent, tracker.step_run(parent, "evaluate") as run_id:
        tracker.log_evaluation(run_id, "nocaps_val", captions, scores, gallery=gallery)
    metrics = tracker.client.get_run(run_id).data.metrics
    assert metrics == {"nocaps_val/in-domain/CIDEr": 0.8, "nocaps_val/in-domain/BLEU-4": 0.3,
                       "nocaps_val/overall/CIDEr": 0.6, "nocaps_val/overall/BLEU-4": 0.25}
    local = download_artifacts(run_id=run_id, artifact_path="", dst_path=str(tmp_path / "down"),
                               tracking_uri=tracker.uri)
    assert json.loads((tmp_path / "down" / "metrics" / "nocaps_val.json").read_text()) == scores
    assert json.loads((tmp_path / "down" / "captions" / "nocaps_val.json").read_text()) == {"1": "a dog", "2": "a cat"}
    assert (tmp_path / "down" / "gallery" / "nocaps_val" / "index.html").read_text() == "<html></html>"
    assert local

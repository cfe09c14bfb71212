"""Training against a real MLflow server that stops mid-run: `ituning train` goes on, keeps what the
server missed in the workspace's outbox, ends saying what waits, and `ituning sync` sends it once the
server is back, so the record equals an uninterrupted run's. A run killed with SIGKILL leaves its
MLflow runs RUNNING; the next run of the workspace marks them FAILED. A model registration that meets
the outage waits in the outbox with its evaluation, and `ituning sync` registers and promotes it.

The training processes are the real command line in a subprocess; a few lines around it (PAUSED)
hold the loop at one step until the test says go, so that the server stops at a known point, not at
whatever step a race would give.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import registry
from pipeline.data import build_dataset
from pipeline.tracking import PARENT_TAG, STAGE_TAG
from pipeline.tracking_outbox import ENDED_TAG, OUTBOX, sync
from storage.acquire import download_dataset
from storage.catalog import Catalog
from storage.manifests import load_manifest
from storage.synthetic import write_corpus
from storage.workspace import catalog_path
from tests.harness import mlflow_started

pytestmark = pytest.mark.slow

PAUSE_AT = 2  # the step the paused run waits at, before logging it; step 1 is on the server by then
STEPS = 6  # 6 usable training images with 5 captions each, 10 captions a step, 2 epochs
PAUSED = """
import os, sys, time
from pathlib import Path
from pipeline import tracking
from cli.main import app

marker, logged = Path(os.environ["PAUSE_MARKER"]), tracking.MLflowTrainingCallbacks.on_step

def on_step(self, step, metrics):
    if step == int(os.environ["PAUSE_AT"]):
        marker.write_text(self.run_id)
        while not marker.with_suffix(".go").exists():
            time.sleep(0.1)
    logged(self, step, metrics)

tracking.MLflowTrainingCallbacks.on_step = on_step
sys.argv = ["ituning", *sys.argv[1:]]
app()
"""
DETERMINISTIC = ("loss", "lr", "grad_norm", "epoch", "epoch/train_loss")  # not captions_per_s, a speed


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left():
    """A failing test leaves no paused training process behind."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture
def server(tmp_path):
    """A tracking server of the test's own, since the test stops it: as `make serve` starts it (SQLite
    store, proxied artifacts); `restart(up)` stops or starts it on the same port and store."""
    from cli.services import start_mlflow, stop_all

    with mlflow_started(tmp_path / "server") as settings:
        yield settings, lambda up: start_mlflow(settings) if up else stop_all(settings)


@pytest.fixture
def workspace(tmp_path, standin_backbones) -> Path:
    """COCO of the synthetic corpus, downloaded and catalogued, with a tiny config (run.yaml)."""
    root = tmp_path / "workspace"
    corpus = write_corpus(tmp_path / "corpus", 15, seed=1)
    download_dataset(load_manifest(corpus.manifests["coco"]), root)
    with Catalog(catalog_path(root)) as catalog:
        build_dataset(root, "coco", catalog, workers=1)
        assert len(catalog.usable_images("coco", "train")) == 6
    (root / "run.yaml").write_text(yaml.safe_dump({
        "name": "outage", "device": "cpu",
        "model": {"vision_model": standin_backbones.vision_model, "vision_pretrained": None,
                  "language_model": standin_backbones.language_model},
        "stages": [{"name": "finetune", "dataset": "coco", "epochs": 2, "batch_size": 10, "micro_batch_size": 10,
                    "precision": "fp32", "val_split": None, "seed": 5}]}))
    return root


def ituning(workspace: Path, url: str, *arguments: str, paused: bool = False, wait: bool = True):
    """The command line in a subprocess against the server at `url`; with `paused`, held at PAUSE_AT."""
    environment = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(Path(__file__).parents[1]),
                   "PAUSE_AT": str(PAUSE_AT), "PAUSE_MARKER": str(workspace / "paused")}
    command = [sys.executable, "-c", PAUSED] if paused else [str(Path(sys.executable).with_name("ituning"))]
    process = subprocess.Popen([*command, *arguments, "--workspace", str(workspace)], env=environment, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    STARTED.append(process)
    if not wait:
        return process
    stdout, stderr = process.communicate()
    return process.returncode, stdout, stderr


def train(workspace: Path, url: str, *extra: str, **options):
    return ituning(workspace, url, "train", "--config", str(workspace / "run.yaml"), "--device", "cpu", *extra,
                   **options)


def wait_until_paused(workspace: Path, process: subprocess.Popen) -> str:
    """The stage run's id, once the paused run holds at PAUSE_AT."""
    marker = workspace / "paused"
    while not marker.is_file():
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    run_id = marker.read_text()
    marker.unlink()
    return run_id


def go_on(workspace: Path) -> None:
    (workspace / "paused.go").touch()


def record(client: MlflowClient, stage_run_id: str) -> dict:
    """What the server holds of a stage run and its parent: status, params, metric histories
    (steps; values of the deterministic ones), the artifacts' paths."""
    runs = {"stage": client.get_run(stage_run_id)}
    runs["parent"] = client.get_run(runs["stage"].data.tags[PARENT_TAG])
    kept = {}
    for role, run in runs.items():
        histories = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
        kept[role] = {
            "status": run.info.status, "params": run.data.params,
            "steps": {key: [metric.step for metric in history] for key, history in histories.items()},
            "values": {key: [metric.value for metric in history] for key, history in histories.items()
                       if key in DETERMINISTIC},
            "artifacts": artifact_paths(client, run.info.run_id),
        }
    return kept


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    paths = []
    for item in client.list_artifacts(run_id, folder):
        paths += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(paths)


def test_training_goes_on_through_a_tracking_outage_and_the_record_ends_as_an_uninterrupted_one(
        server, workspace, tmp_path):
    settings, restart = server
    url = settings.mlflow_url
    client = MlflowClient(tracking_uri=url)

    code, stdout, stderr = train(workspace, url)  # uninterrupted (and encodes the feature cache)
    assert code == 0, stderr
    expected = record(client, stdout.split("(MLflow run ")[-1].split(")")[0])
    assert expected["stage"]["status"] == "FINISHED" and len(expected["stage"]["steps"]["loss"]) == STEPS

    killed = train(workspace, url, "--fresh", paused=True, wait=False)
    killed_run = wait_until_paused(workspace, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed_parent = client.get_run(killed_run).data.tags[PARENT_TAG]
    assert {client.get_run(run).info.status for run in (killed_run, killed_parent)} == {"RUNNING"}

    interrupted = train(workspace, url, "--fresh", paused=True, wait=False)
    stage_run = wait_until_paused(workspace, interrupted)
    for run in (killed_run, killed_parent):  # the new run found the killed one's runs and ended them
        assert client.get_run(run).info.status == "FAILED", run
        assert f"{killed.pid} " in client.get_run(run).data.tags[ENDED_TAG]
    assert [metric.step for metric in client.get_metric_history(stage_run, "loss")] == [1]
    restart(False)
    go_on(workspace)
    stdout, stderr = interrupted.communicate()
    assert interrupted.returncode == 0, stderr
    assert "finetune: modules at" in stdout
    assert (workspace / "runs" / "outage" / "finetune" / "final" / "adapter_model.safetensors").is_file()
    unreachable = [line for line in stderr.splitlines() if "unreachable" in line]
    assert len(unreachable) == 2, stderr  # when it went away, and what waits at the end
    assert unreachable[0].startswith(f"tracking server {url} unreachable (") and "Retrying" not in stderr
    assert "metric values" in unreachable[1] and "run endings" in unreachable[1], unreachable[1]
    assert f"ituning sync --workspace {workspace}" in unreachable[1]

    restart(True)
    assert client.get_run(stage_run).info.status == "RUNNING"  # its end is still in the outbox
    outbox = tmp_path / "outbox-before-sync"
    shutil.copytree(workspace / OUTBOX, outbox)
    code, stdout, stderr = ituning(workspace, url, "sync")
    assert code == 0 and stdout.startswith("sent ") and "metric values" in stdout, stderr
    assert record(client, stage_run) == expected

    shutil.rmtree(workspace / OUTBOX)  # a sync killed after the server took every call, before it noted any
    shutil.copytree(outbox, workspace / OUTBOX)
    (workspace / OUTBOX / "sent.txt").unlink(missing_ok=True)
    assert sync(workspace).startswith("sent ")
    assert record(client, stage_run) == expected  # no metric point twice
    assert sync(workspace).startswith("nothing waits")


def test_runs_begun_while_the_server_is_down_are_created_once_it_answers(server, tmp_path, monkeypatch):
    """In-process, as one run's tracker meets it: the server is down from the start, comes back
    before the run ends, and the run's next call sends what waits first."""
    from pipeline import tracking_outbox
    from pipeline.tracking import ExperimentTracker

    settings, restart = server
    restart(False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.mlflow_url)
    tracker = ExperimentTracker(workspace=tmp_path)
    parent = tracker.start_pipeline("offline", {"epochs": 1}, seed=3)
    step = tracker.start_step(parent, "finetune", {"epochs": 1}, stage="finetune")
    tracker.log_metrics(step, {"loss": 1.5}, step=1)
    tracker.finish(step)
    assert parent.startswith("offline-") and step.startswith("offline-")
    code, _, stderr = ituning(tmp_path, settings.mlflow_url, "sync")
    assert code == 1 and stderr.startswith("error: the tracking server is still unreachable; 6 kept call(s)"), stderr
    restart(True)
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / OUTBOX, kept)
    monkeypatch.setattr(tracking_outbox, "PROBE_EVERY_S", 0.0)  # the next call tries the server at once
    tracker.finish(parent)
    assert not (tmp_path / OUTBOX / "calls.jsonl").exists()
    (tmp_path / OUTBOX / "sent.txt").unlink()  # as if that send was cut short before it noted anything
    shutil.copytree(kept, tmp_path / OUTBOX, dirs_exist_ok=True)
    assert sync(tmp_path).startswith("sent 2 runs to create, 1 metric values, ")  # found, not created again
    client = MlflowClient(tracking_uri=settings.mlflow_url)
    [created] = client.search_runs([client.get_experiment_by_name("ituning").experiment_id],
                                   f"tags.`{STAGE_TAG}` = 'finetune'")
    assert [(metric.step, metric.value) for metric in client.get_metric_history(created.info.run_id, "loss")] == \
        [(1, 1.5)]
    parent_run = client.get_run(created.data.tags[PARENT_TAG])
    assert (parent_run.info.status, created.info.status) == ("FINISHED", "FINISHED")
    assert parent_run.data.params["seed"] == "3" and parent_run.data.tags["mlflow.runName"] == "offline"
    assert not ExperimentTracker(workspace=tmp_path).start_pipeline("after").startswith("offline-")


def test_a_registration_during_an_outage_waits_and_sync_registers_and_promotes_it(
        server, standin_checkpoint, tmp_path, monkeypatch):
    """In-process, as the pipeline's last steps meet it: the stage's run exists, then the server goes
    down before the model is registered and compared with the champion."""
    from pipeline.tracking import ExperimentTracker

    settings, restart = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.mlflow_url)
    tracker = ExperimentTracker(workspace=tmp_path)
    run = tracker.start_pipeline("registered", {"epochs": 1}, seed=3)
    restart(False)
    model = registry.register_captioner(tmp_path, str(standin_checkpoint), run, "outage-captioner")
    assert model["version"] is None and model["waiting"], model
    scored = {"task": "coco/test@synthetic", "metrics": {"CIDEr": 0.5, "BLEU-4": 0.1}}
    promotion = registry.promote_evaluated(tmp_path, model["name"], None, scored, model["waiting"])
    assert not promotion["promoted"] and f"ituning sync --workspace {tmp_path}" in promotion["reason"]
    assert registry.registration_note(model, promotion).startswith("Registration of outage-captioner waits")
    tracker.finish(run)
    waiting = tracker.pending_summary()
    assert "1 run endings of 1 run(s), 1 model registration(s) kept in" in waiting, waiting

    code, _, stderr = ituning(tmp_path, settings.mlflow_url, "sync")
    assert code == 1 and "1 kept call(s) and 1 model registration(s) wait" in stderr, stderr
    restart(True)
    code, stdout, stderr = ituning(tmp_path, settings.mlflow_url, "sync")
    assert code == 0, stderr
    assert "\nRegistered outage-captioner version 1 (" in stdout and "champion moved to it (no champion yet)" in stdout
    client = MlflowClient(tracking_uri=settings.mlflow_url)
    champion = client.get_model_version_by_alias("outage-captioner", registry.CHAMPION)
    assert (champion.version, champion.run_id) == ("1", run)
    assert champion.tags["metric.CIDEr"] == "0.5" and champion.tags["promotion.task"] == "coco/test@synthetic"
    assert client.get_run(run).info.status == "FINISHED"
    code, stdout, _ = ituning(tmp_path, settings.mlflow_url, "sync")
    assert code == 0 and stdout.startswith("nothing waits") and "Registered" not in stdout
    assert len(client.search_model_versions("name = 'outage-captioner'")) == 1

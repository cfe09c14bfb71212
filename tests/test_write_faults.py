"""Writes the file system refuses and Ctrl-C, planted as a user meets them, `ituning train` in a
subprocess each time: the workspace on a real file system of its own (a 64 MB tmpfs mounted here,
which needs root) that is full, then read-only, then without write permission for the run (root
without the capabilities that override file permissions, so the test needs no other user's access to
the checkout);
and SIGINT once a checkpoint is written. Each ends with one line naming the path and the cause
(exit 1), or where a rerun resumes (exit 130), with no traceback; the rerun then finishes."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.data import build_dataset
from pipeline.training import checkpoint_step
from storage.acquire import download_dataset
from storage.catalog import Catalog
from storage.manifests import load_manifest
from storage.synthetic import write_corpus
from storage.workspace import catalog_path
from tests.test_cli_training import write_config

pytestmark = pytest.mark.slow
ITUNING = str(Path(sys.executable).with_name("ituning"))
RUN_S = 900  # one training run on a busy machine
# setpriv(1): root without the capabilities that let it write where the permission bits say no.
NO_PERMISSION_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.fixture
def small_disk():
    """A 64 MB tmpfs of its own."""
    point = Path(tempfile.mkdtemp(prefix="ituning-disk-"))
    point.chmod(0o755)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=755", "tmpfs", str(point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        point.rmdir()
        pytest.skip(f"a file system of its own needs root here: mount said {mounted.stderr.strip()!r}")
    yield point
    subprocess.run(["umount", "--lazy", str(point)], check=True)
    point.rmdir()


def workspace_on(root: Path, backbones) -> tuple[Path, Path]:
    """A catalogued synthetic COCO workspace and a one-epoch config, their backbones copied beside them."""
    workspace = root / "workspace"
    corpus = write_corpus(root / "corpus", 15, seed=1)
    download_dataset(load_manifest(corpus.manifests["coco"]), workspace)
    with Catalog(catalog_path(workspace)) as catalog:
        build_dataset(workspace, "coco", catalog, workers=1)
    local = type(backbones)(**{**backbones.to_dict(), "vision_model": copied(backbones.vision_model, root / "vision"),
                               "language_model": copied(backbones.language_model, root / "language")})
    return workspace, write_config(root / "run.yaml", local)


def copied(reference: str, to: Path) -> str:
    """A backbone folder copied to `to`, named as the reference names it (`local-dir:PATH` or PATH)."""
    local = reference.startswith("local-dir:")
    shutil.copytree(reference.removeprefix("local-dir:"), to)
    return f"local-dir:{to}" if local else str(to)


def train(workspace: Path, config: Path, *extra: str, prefix: tuple[str, ...] = (), **options) -> subprocess.CompletedProcess:
    """`ituning train` in a subprocess (`prefix` runs it through another command, such as setpriv)."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return subprocess.run([*prefix, ITUNING, "train", "--config", str(config), "--workspace", str(workspace), *extra],
                          capture_output=True, text=True, timeout=RUN_S, env={**env, **options.pop("env", {})},
                          **options)


def fill(disk: Path) -> Path:
    """Write a file until the file system refuses more (ENOSPC); returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
        except OSError as error:
            assert error.errno == 28, error
    return filler


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr and "autoflush" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def test_full_read_only_and_unwritable_workspaces_say_the_path_and_cause_and_leave_nothing_in_the_way(
        small_disk, standin_backbones):
    workspace, config = workspace_on(small_disk, standin_backbones)
    filler = fill(small_disk)
    full = train(workspace, config)
    line = one_error_line(full)
    assert full.returncode == 1 and line.startswith(f"error: {small_disk}/"), full.stderr
    assert "No space left on device" in line, line

    filler.unlink()
    again = train(workspace, config)  # nothing the full disk left half-written blocks it
    assert again.returncode == 0 and "finetune: modules at " in again.stdout, again.stderr

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        read_only = train(workspace, config, "--fresh")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    line = one_error_line(read_only)
    assert read_only.returncode == 1 and line.startswith(f"error: {small_disk}/"), read_only.stderr
    assert "Read-only file system" in line, line

    subprocess.run(["chmod", "-R", "a-w", str(workspace)], check=True)  # the workspace stays root's
    try:
        unwritable = train(workspace, config, "--fresh", prefix=NO_PERMISSION_OVERRIDE)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(workspace)], check=True)
    line = one_error_line(unwritable)
    assert unwritable.returncode == 1 and line.startswith(f"error: {small_disk}/"), unwritable.stderr
    assert "Permission denied" in line, line


def test_ctrl_c_during_training_says_where_a_rerun_resumes_and_the_rerun_does(catalogued_workspace, standin_backbones,
                                                                              tmp_path):
    config = write_config(tmp_path / "run.yaml", standin_backbones, epochs=40, batch_size=2, micro_batch_size=2,
                          checkpoint_every_steps=3)
    stage = catalogued_workspace / "runs" / "cli" / "finetune"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    running = subprocess.Popen([ITUNING, "train", "--config", str(config), "--workspace", str(catalogued_workspace)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    state = stage / "last" / "trainer_state.json"
    while not state.is_file() and running.poll() is None:
        subprocess.run(["sleep", "0.2"])
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=RUN_S)
    step = checkpoint_step(stage)
    assert running.returncode == 130 and step > 0, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted; rerun to resume from step {step}", stderr
    for noise in ("Traceback", "ValueError", "Crash detected", "Aborted"):
        assert noise not in stderr, stderr

    resumed = train(catalogued_workspace, config)
    assert resumed.returncode == 0, resumed.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{catalogued_workspace / 'mlflow.db'}")
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in run.data.tags]  # the stage's child runs: interrupted, then resumed
    rerun = max(runs, key=lambda run: run.info.start_time)
    steps = [metric.step for metric in client.get_metric_history(rerun.info.run_id, "loss")]
    assert len(runs) == 2 and min(steps) == step + 1, steps


@pytest.fixture
def catalogued_workspace(tmp_path) -> Path:
    root = tmp_path / "workspace"
    corpus = write_corpus(tmp_path / "corpus", 15, seed=1)
    download_dataset(load_manifest(corpus.manifests["coco"]), root)
    with Catalog(catalog_path(root)) as catalog:
        build_dataset(root, "coco", catalog, workers=1)
    return root

"""A copied or moved workspace reuses everything that finished: the session's demo pipeline run
(tests/flow_fixtures.py), its workspace copied to another folder and the original moved away while
the test runs (so nothing can read it), then the pipeline run again on the copy, in a subprocess as a
user runs it. Nothing encodes or trains again, and the copy's checkpoint captions with the original gone."""

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.flow_fixtures import SMALL_RUN

ROOT = Path(__file__).resolve().parent.parent
ITUNING = str(Path(sys.executable).parent / "ituning")
STEP_LINE = re.compile(r"^  ([^\t\n]+?) +(ran|reused)\b", re.MULTILINE)  # "  finetune   reused  run <id>"


def run_pipeline(workspace: Path) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PREFECT_", "MLFLOW_TRACKING_URI", "ITUNING_WORKSPACE"))}
    options = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL_RUN.items()]
    result = subprocess.run([ITUNING, "pipeline", *options, "--workspace", str(workspace)], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def file_digests(folder: Path, pattern: str) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.glob(pattern)) if path.is_file()}


@contextmanager
def moved_away(folder: Path):
    """`folder` gone for the block (nothing can read it), back afterwards for the other tests of the demo run,
    which run one after the other on one worker (tests/conftest.py)."""
    hidden = folder.with_name(folder.name + "-moved-away")
    folder.rename(hidden)
    try:
        yield
    finally:
        hidden.rename(folder)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the session's demo run may start here, then the rerun
def test_a_copied_workspace_reuses_every_finished_step_and_names_only_its_own_files(demo_run, tmp_path):
    original = demo_run.workspace
    copy = tmp_path / "elsewhere" / "moved-ws"
    shutil.copytree(original, copy, symlinks=True)
    with moved_away(original):
        check_the_copy(original, copy, tmp_path)


def check_the_copy(original: Path, copy: Path, tmp_path: Path) -> None:
    shards = file_digests(copy, "features/**/shard-*.h5")
    checkpoints = file_digests(copy, "runs/**/*.safetensors")
    assert shards and checkpoints

    rerun = run_pipeline(copy)

    states = dict(STEP_LINE.findall(rerun.stdout))
    assert {"catalog", "stand-in backbones", "features coco/train", "finetune", "evaluate coco/test"} <= set(states)
    assert set(states.values()) == {"reused"}, rerun.stdout
    assert "Same weights as ituning-demo version 1" in rerun.stdout, rerun.stdout
    assert re.search(r"^  CLIP-S +\d", rerun.stdout, re.MULTILINE), rerun.stdout  # the stand-in CLIP was found
    assert file_digests(copy, "features/**/shard-*.h5") == shards
    assert file_digests(copy, "runs/**/*.safetensors") == checkpoints
    assert not original.exists()
    everything = "\n".join(path.read_text(errors="replace") for pattern in ("runs/**/*.json", "features/**/*.json")
                           for path in copy.glob(pattern))
    assert str(original) not in everything  # records name no path of the original
    with sqlite3.connect(copy / "mlflow.db") as store:
        locations = [row[0] for row in store.execute("SELECT artifact_uri FROM runs")]
    assert locations and all(location.startswith(copy.resolve().as_uri()) for location in locations), locations

    checkpoint = copy / "runs" / "demo" / "finetune" / "best"
    image = next((copy / "data" / "coco").rglob("*.jpg"))
    captioned = subprocess.run([ITUNING, "caption", str(image), "--checkpoint", str(checkpoint), "--device", "cpu"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert captioned.returncode == 0, captioned.stderr[-3000:]
    path, caption = captioned.stdout.strip().split("\t")
    assert path == str(image) and caption.strip()
    # the registry of the copy's store: the served model's bundled checkpoint and backbones, read from the copy
    served = subprocess.run([ITUNING, "caption", str(image), "--model", "ituning-demo@champion", "--workspace",
                             str(copy), "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={name: value for name, value in os.environ.items()
                                 if not name.startswith(("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"))})
    assert served.returncode == 0, served.stderr[-3000:]
    assert served.stdout.strip().split("\t")[1].strip()

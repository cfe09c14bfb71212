"""The demo pipeline run the tests share: `ituning pipeline` on a small synthetic corpus (a few minutes on
2 cores), run once per test session.

Tests that only read what it made (its terminal output, its workspace: catalog, feature cache,
checkpoints, MLflow store, registry) take `demo_run`; a test that changes the workspace takes a copy of
it (`demo_workspace_copy`), so that the others still see the run as it finished.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import BIN, ROOT

SMALL_RUN = {"config": "demo", "synthetic_images": 30, "shard_size": 64, "device": "cpu", "gallery_size": 4,
             "backbone_steps": 30}


@dataclass(frozen=True)
class DemoRun:
    workspace: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The run as `make demo` makes it: in a subprocess, with its own temporary Prefect server and the
    workspace's own MLflow store (no PREFECT_* or MLFLOW_TRACKING_URI from the test process)."""
    workspace = tmp_path_factory.mktemp("demo-run") / "ws"
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
    options = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL_RUN.items()]
    result = subprocess.run([str(BIN / "ituning"), "pipeline", *options, "--workspace", str(workspace)], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return DemoRun(workspace, result.stdout, result.stderr)


@pytest.fixture
def demo_workspace_copy(demo_run, tmp_path) -> Path:
    """A copy of the demo run's workspace, this test's to change."""
    return Path(shutil.copytree(demo_run.workspace, tmp_path / "ws", symlinks=True))

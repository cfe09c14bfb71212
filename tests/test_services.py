"""`make serve`, a deployment run through the real servers, `make stop` (all on 127.0.0.1, free ports)."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.flow_fixtures import SMALL_RUN
from tests.ports import free_port
from tests.service_logs import assert_clean_log

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def exported(env_file: Path) -> dict[str, str]:
    pairs = [line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines()]
    return {key: value for key, value in pairs if key != "PATH"}


def run_deployment(env: dict, *params: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "prefect"), "deployment", "run", "full-pipeline/demo", "--watch"]
    for param in params:
        command += ["--param", param]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def assert_page_captions_with_the_champion(app_url: str) -> None:
    """The page `make serve` started (before any model was registered) now offers the champion the demo
    deployment registered, and captions with it."""
    import io

    from tests.scene_images import shape_image

    with urllib.request.urlopen(f"{app_url}/api/models", timeout=30) as response:
        models = json.load(response)
    assert models["default"] == "ituning-demo@champion" and models["choices"][0] == "ituning-demo@champion"
    image = io.BytesIO()
    shape_image("red", "circle").save(image, format="PNG")
    request = urllib.request.Request(f"{app_url}/api/caption", data=image.getvalue(), method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.load(response)
    assert answer["model"] == "ituning-demo@champion" and answer["caption"]
    assert len(answer["heatmaps"]) == len(answer["tokens"])


def test_make_serve_runs_the_demo_deployment_then_make_stop(tmp_path):
    from mlflow import MlflowClient

    workspace = tmp_path / "ws"
    base = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_"))}
    base.update(ITUNING_WORKSPACE=str(workspace), ITUNING_PREFECT_PORT=str(free_port()),
                ITUNING_MLFLOW_PORT=str(free_port()), ITUNING_APP_PORT=str(free_port()),
                PREFECT_HOME=str(workspace / "prefect"))
    try:
        subprocess.run(["make", "serve"], cwd=ROOT, env=base, check=True, timeout=300, capture_output=True)
        env = {**base, **exported(workspace / "services" / "env.sh")}
        refused = run_deployment(env, "synthetic_images=3")
        assert refused.returncode != 0 and "synthetic_images" in refused.stdout + refused.stderr
        params = [f"{key}={value}" for key, value in SMALL_RUN.items() if key != "config"]
        result = run_deployment(env, *params, f"workspace={workspace}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Completed" in result.stdout
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert {run.data.tags.get("mlflow.runName") for run in runs} >= {"full-pipeline-demo"}
        assert len(runs) >= 3  # the parent run, its fine-tuning and its evaluation
        assert_page_captions_with_the_champion(f"http://127.0.0.1:{base['ITUNING_APP_PORT']}")
    finally:
        stopped = subprocess.run(["make", "stop"], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120)
    assert "worker" in stopped.stdout and "prefect-server" in stopped.stdout and "app" in stopped.stdout
    assert not list((workspace / "services").glob("*.pid"))
    for service in ("prefect-server", "mlflow", "worker", "app"):
        assert_clean_log(workspace / "services" / f"{service}.log")

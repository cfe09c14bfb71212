"""`ituning doctor` in a subprocess, as a user runs it before a long job: one row per item, exit 0
where the pipeline can run (Java here), exit 1 with the failing rows named where it cannot (no Java
on PATH, a configured MLflow server that does not answer); the fast paths' self-checks on a tiny
model, their failures injected through the test-only point of ituning/fault_injection.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.fast_path_checks import self_check
from ituning.fault_injection import FAULTS_VARIABLE
from ituning.fast_paths import PATHS
from tests.ports import free_port

ITUNING = Path(sys.executable).with_name("ituning")
ITEMS = ["python", "transformers", "open_clip", "prefect", "mlflow", "duckdb", "torch", "cuda", "driver", "gpu",
         "java", "spice corenlp", "hf cache", "hf offline", "workspace", "mlflow tracking", "prefect api",
         *[f"fast path {path.name}" for path in PATHS]]


def doctor(tmp_path: Path, *arguments: str, **environment: str) -> subprocess.CompletedProcess:
    base = {name: value for name, value in os.environ.items()
            if not name.startswith(("MLFLOW_TRACKING", "PREFECT_API", FAULTS_VARIABLE))}
    return subprocess.run([ITUNING, "doctor", "--workspace", str(tmp_path / "ws"), *arguments], capture_output=True,
                          text=True, env={**base, **environment}, timeout=600)


@pytest.mark.slow
def test_doctor_says_the_pipeline_can_run_here_and_checks_each_fast_path(tmp_path):
    done = doctor(tmp_path, "--json", "--device", "cpu",
                  **{FAULTS_VARIABLE: ",".join(path.name for path in PATHS)})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    rows = {row["item"]: row for row in report["rows"]}
    assert report["ready"] and list(rows) == ITEMS
    assert rows["java"]["status"] == "ok" and "version" in rows["java"]["detail"]
    assert rows["mlflow tracking"]["detail"].startswith("sqlite:") and rows["workspace"]["status"] == "ok"
    for path in PATHS:  # each one's check ran on the tiny model and met its injected failure
        row = rows[f"fast path {path.name}"]
        assert row["status"] == "warn" and "falls back to the plain path: InjectedFault" in row["detail"], row


@pytest.mark.slow
def test_doctor_fails_without_java_and_names_an_unreachable_tracking_server(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = doctor(tmp_path, "--device", "cpu", PATH=str(empty), MLFLOW_TRACKING_URI=server)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("  ")[0].strip() for line in lines[:-1]] == ITEMS  # one row per item, then the verdict
    row = {line.split("  ")[0].strip(): line for line in lines[:-1]}
    assert " fail " in row["java"] and "not on PATH" in row["java"]
    assert " fail " in row["mlflow tracking"] and f"{server} unreachable" in row["mlflow tracking"]
    assert " info " in row["fast path compile"] and "CUDA only" in row["fast path compile"]
    assert lines[-1].startswith("not ready")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_fast_path_passes_its_self_check(tmp_path):
    assert self_check(torch.device("cuda"), tmp_path) == {path.name: "on" for path in PATHS}

"""The MLflow tracking server as `make serve` starts it (pipeline/services.py), configured as
docs/deployment.md says: runs in PostgreSQL (ITUNING_MLFLOW_BACKEND_URI) and artifacts on
S3-compatible storage (ITUNING_MLFLOW_ARTIFACTS, MLFLOW_S3_ENDPOINT_URL), here moto's S3 server. A run
tracked by the pipeline's own ExperimentTracker lands in PostgreSQL's tables, its checkpoint in the
bucket, and the checkpoint downloads back through the server byte for byte."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ituning.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from pipeline.services import ServiceSettings, start_mlflow, stop_all
from pipeline.tracking import ExperimentTracker
from tests.postgres_fixtures import needs_postgres, postgres  # noqa: F401  (postgres is a fixture)
from tests.service_logs import assert_clean_log
from tests.ports import free_port

pytestmark = [pytest.mark.slow, needs_postgres]
BUCKET, PREFIX = "ituning-artifacts", "mlflow"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def bucket_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=CREDENTIALS["AWS_DEFAULT_REGION"])


@pytest.fixture
def s3_endpoint(tmp_path):
    """moto's standalone S3 server, its requests and errors logged to moto.log."""
    port, log = free_port(), tmp_path / "moto.log"
    with log.open("wb") as output:
        command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, f"moto_server did not start: {log}"
                time.sleep(0.3)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert_clean_log(log)


@pytest.fixture
def tracking_server(postgres, s3_endpoint, tmp_path, monkeypatch):  # noqa: F811
    postgres.create_database("mlflow")
    bucket_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    server_only = {**CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    for name, value in {**server_only, "ITUNING_MLFLOW_BACKEND_URI": postgres.url("psycopg2", "mlflow"),
                        "ITUNING_MLFLOW_ARTIFACTS": f"s3://{BUCKET}/{PREFIX}"}.items():
        monkeypatch.setenv(name, value)
    settings = ServiceSettings(tmp_path / "ws", mlflow_port=free_port())
    try:
        start_mlflow(settings)
        for name in server_only:  # the server proxies artifacts: its clients need no storage settings
            monkeypatch.delenv(name)
        yield settings.mlflow_url
    finally:
        assert stop_all(settings) == ["mlflow"]
    assert_clean_log(settings.directory / "mlflow.log")


def test_tracking_server_keeps_runs_in_postgresql_and_artifacts_in_s3(tracking_server, postgres, s3_endpoint,  # noqa: F811
                                                                      standin_checkpoint, tmp_path):
    tracker = ExperimentTracker(uri=tracking_server)
    with tracker.pipeline_run("deployment-check", config={"train": {"learning_rate": 0.001}}, seed=7) as run_id:
        tracker.log_metrics(run_id, {"loss": 2.5}, step=3)
        tracker.log_checkpoint(run_id, standin_checkpoint)

    assert postgres.query("mlflow", "SELECT status FROM runs WHERE run_uuid = %s", (run_id,)) == [("FINISHED",)]
    params = dict(postgres.query("mlflow", "SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)))
    assert params["train.learning_rate"] == "0.001" and params["seed"] == "7"
    assert "adapter.backbones.language_model" in params  # adapter_config.json, logged with the checkpoint
    metrics = postgres.query("mlflow", "SELECT key, value, step FROM metrics WHERE run_uuid = %s", (run_id,))
    assert metrics == [("loss", 2.5, 3)]
    [(location,)] = postgres.query("mlflow", "SELECT artifact_location FROM experiments WHERE experiment_id = %s",
                                   (int(tracker.experiment_id),))
    assert location.startswith("mlflow-artifacts:")  # proxied: the server, not the client, writes to S3

    bucket = bucket_client(s3_endpoint)
    run_prefix = f"{PREFIX}/{tracker.experiment_id}/{run_id}/artifacts/checkpoint"
    listed = bucket.list_objects_v2(Bucket=BUCKET, Prefix=run_prefix)["Contents"]
    assert {entry["Key"] for entry in listed} == {f"{run_prefix}/{WEIGHTS_FILE}", f"{run_prefix}/{CONFIG_FILE}"}
    weights = (Path(standin_checkpoint) / WEIGHTS_FILE).read_bytes()
    assert bucket.get_object(Bucket=BUCKET, Key=f"{run_prefix}/{WEIGHTS_FILE}")["Body"].read() == weights

    downloaded = tracker.client.download_artifacts(run_id, f"checkpoint/{WEIGHTS_FILE}", str(tmp_path / "back"))
    assert Path(downloaded).read_bytes() == weights

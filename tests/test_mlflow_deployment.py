"""The MLflow tracking server as `make serve` starts it (cli/services.py), configured as
docs/deployment.md says: runs in PostgreSQL (ITUNING_MLFLOW_BACKEND_URI) and artifacts on
S3-compatible storage (ITUNING_MLFLOW_ARTIFACTS, MLFLOW_S3_ENDPOINT_URL), here moto's S3 server. A run
tracked by the pipeline's own ExperimentTracker lands in PostgreSQL's tables, its checkpoint in the
bucket, and the checkpoint downloads back through the server byte for byte."""

import uuid
from pathlib import Path

import pytest

from ituning.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from pipeline.tracking import ExperimentTracker
from tests.harness import S3_CREDENTIALS, mlflow_started, needs_postgres, s3_client

pytestmark = [pytest.mark.slow, needs_postgres]
PREFIX = "mlflow"


@pytest.fixture
def tracking_server(postgres, s3_service, tmp_path, monkeypatch):
    """A tracking server of its own: the session's MLflow server keeps its runs in SQLite."""
    database, bucket = postgres.create_database("mlflow"), f"ituning-artifacts-{uuid.uuid4().hex[:12]}"
    s3_client(s3_service).create_bucket(Bucket=bucket)
    server_only = {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_service}
    configuration = {**server_only, "ITUNING_MLFLOW_BACKEND_URI": postgres.url("psycopg2", database),
                     "ITUNING_MLFLOW_ARTIFACTS": f"s3://{bucket}/{PREFIX}"}
    with mlflow_started(tmp_path / "ws", configuration) as settings:  # its clients need no storage settings:
        yield settings.mlflow_url, database, bucket                      # the server proxies artifacts


def test_tracking_server_keeps_runs_in_postgresql_and_artifacts_in_s3(tracking_server, postgres, s3_service,
                                                                      standin_checkpoint, tmp_path):
    url, database, bucket_name = tracking_server
    tracker = ExperimentTracker(uri=url)
    with tracker.pipeline_run("deployment-check", config={"train": {"learning_rate": 0.001}}, seed=7) as run_id:
        tracker.log_metrics(run_id, {"loss": 2.5}, step=3)
        tracker.log_checkpoint(run_id, standin_checkpoint)

    assert postgres.query(database, "SELECT status FROM runs WHERE run_uuid = %s", (run_id,)) == [("FINISHED",)]
    params = dict(postgres.query(database, "SELECT key, value FROM params WHERE run_uuid = %s", (run_id,)))
    assert params["train.learning_rate"] == "0.001" and params["seed"] == "7"
    assert "adapter.backbones.language_model" in params  # adapter_config.json, logged with the checkpoint
    metrics = postgres.query(database, "SELECT key, value, step FROM metrics WHERE run_uuid = %s", (run_id,))
    assert metrics == [("loss", 2.5, 3)]
    [(location,)] = postgres.query(database, "SELECT artifact_location FROM experiments WHERE experiment_id = %s",
                                   (int(tracker.experiment_id),))
    assert location.startswith("mlflow-artifacts:")  # proxied: the server, not the client, writes to S3

    bucket = s3_client(s3_service)
    run_prefix = f"{PREFIX}/{tracker.experiment_id}/{run_id}/artifacts/checkpoint"
    listed = bucket.list_objects_v2(Bucket=bucket_name, Prefix=run_prefix)["Contents"]
    assert {entry["Key"] for entry in listed} == {f"{run_prefix}/{WEIGHTS_FILE}", f"{run_prefix}/{CONFIG_FILE}"}
    weights = (Path(standin_checkpoint) / WEIGHTS_FILE).read_bytes()
    assert bucket.get_object(Bucket=bucket_name, Key=f"{run_prefix}/{WEIGHTS_FILE}")["Body"].read() == weights

    downloaded = tracker.client.download_artifacts(run_id, f"checkpoint/{WEIGHTS_FILE}", str(tmp_path / "back"))
    assert Path(downloaded).read_bytes() == weights

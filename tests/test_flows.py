"""The flows under one Prefect test server for the whole session: parameter checks, and the full
pipeline twice on a small synthetic corpus (the second run reuses every finished stage)."""

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate

from flows.full_pipeline import full_pipeline
from flows.parameters import PRESETS
from tests.flow_fixtures import SMALL_RUN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("results")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def pipeline_runs(prefect_server, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("pipeline")
    first = full_pipeline(workspace=str(workspace), **SMALL_RUN)
    second = full_pipeline(workspace=str(workspace), **SMALL_RUN)
    return workspace, first, second


@pytest.mark.parametrize("bad", [{"synthetic_images": 3}, {"config": "coco-gpt3"}, {"evaluate_on": ["train"]},
                                 {"device": "gpu0"}, {"source": "ftp"}])
def test_bad_parameters_are_rejected_by_the_deployment_schema(bad):
    schema = parameter_schema(full_pipeline).model_dump_for_openapi()
    validate({"config": "demo"}, schema, raise_on_error=True)
    with pytest.raises(ValidationError):
        validate(bad, schema, raise_on_error=True)


def test_bad_parameters_stop_a_flow_run_before_any_work(prefect_server, tmp_path):
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="synthetic_images"):
        full_pipeline(workspace=str(tmp_path / "ws"), synthetic_images=3)
    assert not (tmp_path / "ws").exists()


def test_full_pipeline_trains_evaluates_and_registers(pipeline_runs):
    workspace, first, _ = pipeline_runs
    assert [record["stage"] for record in first["stages"]] == ["finetune", "evaluate coco/test"]
    assert not any(record["cached"] for record in first["stages"])
    assert 0 <= first["test"]["CIDEr"] and first["test"]["BLEU-1"] > 0
    assert first["model"]["version"] == "1" and first["promotion"]["promoted"]
    assert first["sample"] and any(caption for _, caption in first["sample"])


def test_rerun_with_nothing_changed_reuses_every_stage_and_says_so(pipeline_runs):
    from mlflow import MlflowClient

    from storage.tracking import tracking_uri

    workspace, first, second = pipeline_runs
    assert all(record["cached"] for record in second["stages"])
    assert second["test"] == first["test"]
    assert second["parent_run_id"] != first["parent_run_id"]
    assert not second["promotion"]["promoted"]  # the same version is not better than itself
    runs = MlflowClient(tracking_uri(workspace)).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri(workspace)).search_experiments()])
    assert {run.info.run_id for run in runs} >= {first["parent_run_id"], first["stages"][0]["run_id"]}


def test_summary_artifact_lists_stages_and_reuse(pipeline_runs, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-summary"])))
    texts = [artifact.data for artifact in artifacts]
    assert len(texts) >= 2
    assert any("| finetune | cached: reused, not re-run |" in text for text in texts)
    assert any("| finetune | ran |" in text for text in texts)


def test_prefect_yaml_deploys_the_demo_every_preset_and_a_scheduled_retrain():
    from pathlib import Path

    spec = yaml.safe_load(Path(__file__).resolve().parent.parent.joinpath("prefect.yaml").read_text())
    deployments = {(d["entrypoint"], d["name"]): d for d in spec["deployments"]}
    pipeline = {name for entry, name in deployments if entry == "flows/full_pipeline.py:full_pipeline"}
    assert pipeline == set(PRESETS)
    retrain = deployments[("flows/retrain.py:retrain", "retrain-weekly")]
    assert retrain["schedules"][0]["cron"] == "0 3 * * 1"
    assert all(d["work_pool"]["name"] == "ituning-local" for d in spec["deployments"])
    for entry, _ in deployments:
        assert Path(entry.split(":")[0]).exists()


def test_data_flows_then_feature_shards_on_a_local_dask_cluster(prefect_server, tmp_path):
    from prefect_dask import DaskTaskRunner

    from flows.cache_features import cache_features
    from flows.download_datasets import download_datasets
    from flows.prepare_splits import prepare_splits
    from storage.features import FeatureReader

    workspace = str(tmp_path / "ws")
    [report] = download_datasets(datasets=["coco"], workspace=workspace, synthetic_images=30)
    assert report["dataset"] == "coco" and report["fetched"] and not report["failures"]
    assert prepare_splits(datasets=["coco"], workspace=workspace)["coco"]
    on_dask = cache_features.with_options(task_runner=DaskTaskRunner(
        cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": False}))
    entries = on_dask(dataset="coco", splits=["train", "test"], workspace=workspace, shard_size=4, device="cpu",
                      backbone_steps=5)
    with FeatureReader(entries["coco/train"]) as train, FeatureReader(entries["coco/test"]) as test:
        assert len(train) > 4 and len(test) > 0  # several shards each
        assert set(train.image_ids).isdisjoint(test.image_ids)


def test_retrain_registers_a_new_version_and_records_the_comparison(pipeline_runs):
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from storage.tracking import tracking_uri

    workspace, first, _ = pipeline_runs
    outcome = retrain(config="demo", workspace=str(workspace), device="cpu")
    model, promotion = outcome["model"], outcome["promotion"]
    assert model["version"] == "2"
    assert promotion["champion"] == pytest.approx(first["test"]["CIDEr"])
    assert promotion["promoted"] == (promotion["candidate"] > promotion["champion"])
    client = MlflowClient(tracking_uri(workspace), registry_uri=tracking_uri(workspace))
    tags = client.get_model_version(model["name"], "2").tags
    assert tags["promotion.champion_version"] == "1" and tags["promotion.promoted"] == str(promotion["promoted"])
    expected_champion = "2" if promotion["promoted"] else "1"
    assert str(client.get_model_version_by_alias(model["name"], "champion").version) == expected_champion

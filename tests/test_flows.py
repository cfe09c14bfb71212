"""The flows, reporting to the session's Prefect server (tests/harness.py): parameter checks, the full
pipeline on a small synthetic corpus (run again unchanged it reuses every finished stage; run after
a catalog change it redoes what reads the changed split), and feature shards on Dask worker processes."""

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate

from flows.full_pipeline import full_pipeline
from flows.parameters import PRESETS
from storage.feature_cache import FeatureReader
from tests.flow_fixtures import SMALL_RUN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def pipeline_runs(prefect_api, tmp_path_factory):
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


def test_bad_parameters_stop_a_flow_run_before_any_work(prefect_api, tmp_path):
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="synthetic_images"):
        full_pipeline(workspace=str(tmp_path / "ws"), synthetic_images=3)
    assert not (tmp_path / "ws").exists()


def test_full_pipeline_trains_evaluates_and_registers(pipeline_runs):
    workspace, first, _ = pipeline_runs
    assert [record["step"] for record in first["steps"]] == ["finetune", "evaluate coco/test"]
    assert not any(record["cached"] for record in first["steps"])
    assert 0 <= first["test"]["CIDEr"] and first["test"]["BLEU-1"] > 0
    assert first["model"]["version"] == "1" and first["promotion"]["promoted"]
    assert first["sample"] and any(caption for _, caption in first["sample"])


def test_rerun_with_nothing_changed_reuses_every_stage_and_says_so(pipeline_runs):
    from mlflow import MlflowClient

    from pipeline.tracking import tracking_uri

    workspace, first, second = pipeline_runs
    assert all(record["cached"] for record in second["steps"])
    assert second["test"] == first["test"]
    assert second["parent_run_id"] != first["parent_run_id"]
    assert not second["promotion"]["promoted"]  # the same version is not better than itself
    client = MlflowClient(tracking_uri(workspace), registry_uri=tracking_uri(workspace))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {run.info.run_id for run in runs} >= {first["parent_run_id"], first["steps"][0]["run_id"]}
    # no clutter: the same weights stay one version, and the run in which nothing ran says so
    assert second["model"]["version"] == first["model"]["version"] and not second["model"]["new_version"]
    assert [str(v.version) for v in client.search_model_versions(f"name = '{first['model']['name']}'")] == ["1"]
    reused = {run.info.run_id: run.data.tags.get("ituning.reused") for run in runs}
    assert reused[second["parent_run_id"]] == "true" and reused[first["parent_run_id"]] is None


def test_rerun_after_the_catalog_changed_redoes_what_reads_the_changed_split_and_reuses_the_rest(pipeline_runs,
                                                                                                tmp_path):
    from mlflow import MlflowClient

    from storage.catalog import Catalog
    from pipeline.tracking import tracking_uri

    workspace, _, _ = pipeline_runs
    with Catalog(workspace / "catalog.duckdb") as catalog:  # a test image found unusable after the runs
        test_images = [image.image_id for image in catalog.usable_images("coco", "test")]
        catalog.connection.execute("UPDATE images SET status = 'unreadable', reason = 'marked by hand' "
                                   "WHERE dataset = 'coco' AND split = 'test' AND image_id = ?", [test_images[0]])
    # registered under another name, so that the champion of the other tests stays as it was
    state = full_pipeline(workspace=str(workspace), **SMALL_RUN, register_as="after-catalog-change", return_state=True)
    third = state.result()
    assert {record["step"]: record["cached"] for record in third["steps"]} == \
        {"finetune": True, "evaluate coco/test": False}
    shards = {run.name: run.state.name for run in recorded_task_runs(state.state_details.flow_run_id)
              if run.task_key.startswith("cache_feature_shard")}
    encoded_again = {name for name, result in shards.items() if result != "Cached"}
    assert encoded_again and encoded_again == {name for name in shards if name.startswith("features-coco-test-")}
    evaluation = next(record for record in third["steps"] if record["step"] == "evaluate coco/test")
    captions = MlflowClient(tracking_uri(workspace)).download_artifacts(
        evaluation["run_id"], "captions/coco_test.json", str(tmp_path))
    assert sorted(json.loads(Path(captions).read_text())) == test_images[1:]


def test_summary_artifact_lists_stages_and_reuse(pipeline_runs, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-summary"])))
    texts = [artifact.data for artifact in artifacts]
    assert len(texts) >= 2
    assert any("| finetune | cached: reused, not re-run |" in text for text in texts)
    assert any("| finetune | ran |" in text for text in texts)
    first = next(text for text in texts if "| finetune | ran |" in text)
    for step in ("download coco", "catalog", "stand-in backbones", "features coco/train", "features coco/test"):
        assert f"| {step} | ran |" in first, first
    # the rerun with nothing changed reused every shard: no encoding ran
    assert any(all(f"| features coco/{split} | cached: reused, not re-run |" in text for split in ("train", "test"))
               for text in texts), texts
    assert re.search(r"\| catalog \| ran \| coco usable images \d+ \|", first), first


def test_a_shard_damaged_after_its_run_is_encoded_again_and_the_summary_says_rebuilt(pipeline_runs):
    """The shard's task is a cache hit (its inputs did not change); finishing the cache finds the
    damage, encodes the shard again, and the split's feature cache is reported rebuilt, not reused."""
    from tests.shard_damage import overwrite_tokens_in_place
    from pipeline.run_summary import step_status

    workspace, _, _ = pipeline_runs
    [shard, *_] = sorted((workspace / "features" / "coco" / "train").rglob("*.h5"))
    overwrite_tokens_in_place(shard)
    outcome = full_pipeline(workspace=str(workspace), **SMALL_RUN, register_as="after-shard-damage")
    records = {record["step"]: record for record in outcome["data"]}
    assert records["features coco/train"]["rebuilt"] and not records["features coco/train"]["cached"]
    assert step_status(records["features coco/train"]).startswith("rebuilt")
    assert not any(record.get("rebuilt") for step, record in records.items() if step != "features coco/train")
    FeatureReader(next((workspace / "features" / "coco" / "train").rglob("features.json")))  # whole again


def test_the_flow_runs_log_shows_the_progress_of_long_steps(pipeline_runs, prefect_api):
    """What the Prefect UI shows of a run: the INFO lines of ituning.progress, step by step."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterName

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(name=LogFilterName(any_=["ituning.progress"])), limit=200)
    messages = [log.message for log in logs]
    for work in ("vision stand-in", "language stand-in", "encoding coco/train shard 0", "finetune", "captioning"):
        assert any(re.match(rf"{re.escape(work)}: \d+ (steps|images) in ", message) for message in messages), \
            (work, messages[:40])


def test_prefect_yaml_deploys_the_demo_every_preset_and_a_scheduled_retrain():
    from pathlib import Path

    spec = yaml.safe_load(Path(__file__).resolve().parent.parent.joinpath("prefect.yaml").read_text())
    deployments = {(d["entrypoint"], d["name"]): d for d in spec["deployments"]}
    pipeline = {name for entry, name in deployments if entry == "flows/full_pipeline.py:full_pipeline"}
    assert pipeline == set(PRESETS)
    retrain = deployments[("flows/retrain.py:retrain", "retrain-weekly")]
    assert retrain["schedules"][0]["cron"] == "0 3 * * 1"
    assert all(d["work_pool"]["name"] == "ituning-local" for d in spec["deployments"])
    assert ("flows/training.py:evaluate", "default") in deployments
    assert spec["pull"] == [{"flows.checkout.enter_checkout": {}}]
    for entry, _ in deployments:
        assert Path(entry.split(":")[0]).exists()


def test_feature_shards_run_in_dask_worker_processes_that_report_to_the_prefect_api(prefect_api, tmp_path,
                                                                                     monkeypatch):
    from distributed import Client, LocalCluster, get_task_stream

    from flows.cache_features import cache_features, shard_task_runner
    from flows.download_datasets import download_datasets
    from flows.prepare_splits import prepare_splits
    from pipeline import data, features

    workspace = str(tmp_path / "ws")
    [report] = download_datasets(datasets=["coco"], workspace=workspace, synthetic_images=30)
    assert report["dataset"] == "coco" and report["fetched"] and not report["failures"]
    assert prepare_splits(datasets=["coco"], workspace=workspace)["coco"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        worker_pids = client.run(os.getpid)
        monkeypatch.setenv("ITUNING_DASK_ADDRESS", cluster.scheduler_address)
        with get_task_stream(client) as stream:
            state = cache_features.with_options(task_runner=shard_task_runner())(
                dataset="coco", splits=["train", "test"], workspace=workspace, shard_size=4, device="cpu",
                backbone_steps=5, return_state=True)
    entries = state.result()
    shard_workers = [task["worker"] for task in stream.data if task["key"].startswith("cache_feature_shard-")]
    assert os.getpid() not in worker_pids.values()
    assert not any(psutil.pid_exists(pid) for pid in worker_pids.values())  # the cluster closed its workers
    shards = {split: features.feature_shards(workspace, "coco", split, shard_size=4) for split in ("train", "test")}
    assert len(shards["train"]) > 1 and len(shard_workers) == sum(len(indices) for indices in shards.values())
    assert set(shard_workers) <= set(worker_pids)
    shard_runs = [run for run in recorded_task_runs(state.state_details.flow_run_id)
                  if run.task_key.startswith("cache_feature_shard")]
    assert sorted(run.name for run in shard_runs) == sorted(f"features-coco-{split}-{shard}"
                                                            for split, indices in shards.items() for shard in indices)
    assert all(run.state.is_completed() for run in shard_runs)
    for split in shards:
        with FeatureReader(entries[f"coco/{split}"]) as features:
            expected = [image_id for image_id, _ in data.split_images(workspace, "coco", split)]
            assert sorted(features.image_ids) == expected
            tokens = [features[image_id] for image_id in expected]
        assert len({array.shape for array in tokens}) == 1 and all(np.isfinite(array).all() for array in tokens)


def test_dask_workers_setting_starts_one_worker_per_gpu_each_seeing_its_own_and_closing_stops_them(monkeypatch):
    """The GPUs are named, not present (no GPU here): what is checked is that each worker process is
    started seeing only its own, so that `cuda` in it is that GPU."""
    from flows.cache_features import shard_task_runner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.setenv("ITUNING_DASK_WORKERS", "gpus")
    with shard_task_runner() as runner:
        worker_pids = set(runner.client.run(os.getpid).values())
        seen = sorted(runner.client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES")).values())
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert seen == ["2", "5"]
    assert not any(psutil.pid_exists(pid) for pid in worker_pids)


def test_dask_workers_setting_is_a_count_or_gpus_and_spreads_workers_over_the_gpus():
    from pipeline.dask_workers import worker_count, worker_specs

    assert worker_count("3", []) == 3 and worker_count("gpus", ["0", "1"]) == 2
    for bad, message in (("0", "at least 1"), ("many", "a number of workers, or 'gpus'"), ("gpus", "no GPU")):
        with pytest.raises(ValueError, match=message):
            worker_count(bad, [])
    pinned = [spec["options"].get("env", {}).get("CUDA_VISIBLE_DEVICES") for spec in worker_specs(3, ["0", "1"]).values()]
    assert pinned == ["0", "1", "0"]
    assert all("env" not in spec["options"] for spec in worker_specs(2, []).values())


def test_without_cuda_visible_devices_the_gpus_are_those_torch_counts(monkeypatch):
    """Here torch counts none (no GPU), so a worker count pins nothing; "-1" or "" hides every GPU."""
    import torch

    from pipeline.dask_workers import visible_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == [str(index) for index in range(torch.cuda.device_count())]
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert visible_gpus() == []


def recorded_task_runs(flow_run_id, timeout: float = 30.0) -> list:
    """The flow run's task runs as the Prefect server recorded them, once their final states arrived
    (task runs report as events, which the server records a little later)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if (runs and all(run.state.is_final() for run in runs)) or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


def test_retrain_registers_a_new_version_and_records_the_comparison(pipeline_runs, prefect_api):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.retrain import retrain
    from pipeline import evaluation
    from pipeline.tracking import tracking_uri

    from storage.catalog import Catalog

    workspace, first, _ = pipeline_runs
    with Catalog(workspace / "catalog.duckdb") as catalog:  # new training data: new weights, a new version
        image_id = catalog.usable_images("coco", "train")[0].image_id
        catalog.connection.execute("INSERT INTO captions VALUES ('coco', ?, 1000000000, 'a caption added later', "
                                   "'train')", [image_id])
    outcome = retrain(config="demo", workspace=str(workspace), device="cpu")
    model, promotion = outcome["model"], outcome["promotion"]
    assert model["name"] == first["model"]["name"] == "ituning-demo" and model["version"] == "2"
    assert model["new_version"]
    client = MlflowClient(tracking_uri(workspace), registry_uri=tracking_uri(workspace))
    tags = client.get_model_version(model["name"], "2").tags
    assert tags["promotion.champion_version"] == "1" and tags["promotion.promoted"] == str(promotion["promoted"])
    assert tags["promotion.task"] == evaluation.evaluation_task(workspace, "coco", "test")
    if client.get_model_version(model["name"], "1").tags["promotion.task"] == tags["promotion.task"]:
        assert promotion["champion"] == pytest.approx(first["test"]["CIDEr"])
        assert promotion["promoted"] == (promotion["candidate"] > promotion["champion"])
    else:  # an earlier test changed the test split: the champion's score is on other references
        assert promotion["promoted"] and "not comparable" in promotion["reason"]
    expected_champion = "2" if promotion["promoted"] else "1"
    assert str(client.get_model_version_by_alias(model["name"], "champion").version) == expected_champion
    assert tags["promotion.reason"] == promotion["reason"]
    # nothing new to learn: the stage's checkpoint is reused, no version is added, and the summary says so
    again = retrain(config="demo", workspace=str(workspace), device="cpu")
    assert (again["model"]["version"], again["model"]["new_version"]) == ("2", False)
    assert [str(v.version) for v in client.search_model_versions("name = 'ituning-demo'")] == ["2", "1"]
    with get_client(sync_client=True) as prefect:
        summaries = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-summary"])))
    assert any("| finetune | ran: the stage was already trained on these inputs" in item.data for item in summaries)


def test_a_failed_retrain_ends_its_mlflow_parent_run_failed(pipeline_runs):
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from pipeline.tracking import tracking_uri

    workspace, _, _ = pipeline_runs
    client = MlflowClient(tracking_uri(workspace))
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    state = retrain(config="demo", workspace=str(workspace), device="cpu", init_from=str(workspace / "no-such-checkpoint"),
                    return_state=True)
    assert state.is_failed()
    [parent] = client.search_runs(experiments, "attributes.run_name = 'retrain-demo' and attributes.status != 'FINISHED'")
    assert parent.info.status == "FAILED"


def test_download_datasets_reuses_verified_downloads_and_takes_a_local_corpus(prefect_api, tmp_path):
    from flows.download_datasets import download_datasets

    workspace = tmp_path / "ws"
    [synthetic] = download_datasets(datasets=["coco"], workspace=str(workspace), synthetic_images=20)
    # Nothing but loopback is reachable here: finishing means the verified files were reused.
    [again] = download_datasets(datasets=["coco"], source="download", workspace=str(workspace))
    assert again["fetched"] == synthetic["fetched"] and not again["failures"]
    folder = workspace / "data" / "coco"
    [corpus] = download_datasets(datasets=["coco"], source="download", workspace=str(tmp_path / "other"),
                                 corpora={"coco": str(folder)})
    assert corpus["corpus"] == str(folder.resolve()) and (tmp_path / "other" / "data" / "coco").resolve() == folder


# ---- persisted results: plain JSON, and a planted pickle is never loaded -------------------------

from prefect import flow  # noqa: E402


class RunsCode:
    """Unpickling this writes `marker`: what a planted result file could do on a cache hit."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('ran')",)


def pickled_record(marker: Path) -> bytes:
    """A result record as Prefect writes one with its default serializer (cloudpickle), running code when read."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    metadata = ResultRecordMetadata(serializer=PickleSerializer(picklelib="cloudpickle"), storage_key="planted")
    return ResultRecord(result=RunsCode(marker), metadata=metadata).serialize()


def result_files() -> set[Path]:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    return {path for path in Path(PREFECT_LOCAL_STORAGE_PATH.value()).rglob("*") if path.is_file()}


def serializers_named(value) -> list[dict]:
    if isinstance(value, dict):
        return ([value["serializer"]] if isinstance(value.get("serializer"), dict) else []) + \
            [found for item in value.values() for found in serializers_named(item)]
    return [found for item in value for found in serializers_named(item)] if isinstance(value, list) else []


@flow
def demo_corpus(workspace: Path) -> tuple[str, dict]:
    """How the persisted task write-demo-corpus finished (Completed or Cached), and what it returned."""
    from tasks.data import write_demo_corpus

    state = write_demo_corpus(workspace, images=15, return_state=True)
    return state.name, state.result()


def test_persisted_task_results_are_plain_json(prefect_api, tmp_path):
    before = result_files()
    ran, corpus = demo_corpus(tmp_path / "ws")
    written = result_files() - before
    assert ran == "Completed" and written
    stored = [json.loads(path.read_bytes()) for path in written]  # every file parses as JSON
    assert corpus in stored  # the return value itself, readable without Prefect
    assert [serializer["type"] for record in stored for serializer in serializers_named(record)] == ["json"]
    assert demo_corpus(tmp_path / "ws") == ("Cached", corpus)


@pytest.mark.parametrize("planted", ["record", "bare pickle"])
def test_a_planted_pickle_in_the_result_storage_is_never_loaded(prefect_api, tmp_path, planted):
    import cloudpickle

    before = result_files()
    _, corpus = demo_corpus(tmp_path / "ws")
    written = result_files() - before
    marker = tmp_path / "code-ran"
    payload = pickled_record(marker) if planted == "record" else cloudpickle.dumps(RunsCode(marker))
    for path in written:
        path.write_bytes(payload)
    rerun = demo_corpus(tmp_path / "ws")
    assert not marker.exists()
    assert rerun == ("Completed", corpus)  # worked out again ...
    assert all(json.loads(path.read_bytes()) is not None for path in written)  # ... and stored as JSON anew
    assert demo_corpus(tmp_path / "ws") == ("Cached", corpus)


def test_the_pull_step_enters_the_checkout_named_on_the_workers_machine(tmp_path, monkeypatch):
    from flows.checkout import INSTALLED_CHECKOUT, enter_checkout

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ITUNING_HOME", raising=False)
    assert enter_checkout() == {"directory": str(INSTALLED_CHECKOUT)} and Path.cwd() == INSTALLED_CHECKOUT
    (tmp_path / "copy" / "flows").mkdir(parents=True)
    monkeypatch.setenv("ITUNING_HOME", str(tmp_path / "copy"))
    assert enter_checkout() == {"directory": str(tmp_path / "copy")} and Path.cwd() == tmp_path / "copy"
    monkeypatch.setenv("ITUNING_HOME", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="set ITUNING_HOME"):
        enter_checkout()

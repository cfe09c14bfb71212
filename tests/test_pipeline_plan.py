"""The plumbing's plain parts: what a config needs, cache keys, retry conditions, the summary markdown."""

import json
from pathlib import Path

import httpx
import pytest

from storage.downloads import DownloadError, TransientFailure
from pipeline.run_summary import metrics_cell, pipeline_markdown
from pipeline.presets import config_file as config_path
from tasks.caching import WorkspaceInputs, WorkspaceState, is_transient, workspace_identity
from pipeline.plan import plan_for_config


def test_demo_plan_trains_on_the_synthetic_coco_and_tests_it():
    plan = plan_for_config("demo", ["test"])
    assert plan.stages == [{"name": "finetune", "dataset": "coco", "splits": ["train", "val"]}]
    assert plan.feature_splits == [["coco", "train"], ["coco", "val"], ["coco", "test"]]
    assert plan.evaluations == [["coco", "test"]] and plan.datasets == ["coco"] and plan.demo_backbones


def test_vlp_plan_pretrains_on_vg_then_finetunes_and_needs_coco_for_vg():
    plan = plan_for_config("flickr30k-gpt2-vlp", ["test", "nocaps/val"])
    assert [(s["name"], s["dataset"]) for s in plan.stages] == [("pretrain", "vg"), ("finetune", "flickr30k")]
    assert plan.stages[0]["splits"] == ["pretrain"]
    assert plan.evaluations == [["flickr30k", "test"], ["nocaps", "val"]]
    assert plan.datasets == ["coco", "flickr30k", "nocaps", "vg"] and not plan.demo_backbones


def test_a_two_stage_preset_and_the_demo_on_flickr8k_plan_every_dataset_they_read(tmp_path):
    plan = plan_for_config("coco-gpt2-flickr8k", ["test"])
    assert [(s["name"], s["dataset"]) for s in plan.stages] == [("coco", "coco"), ("flickr8k", "flickr8k")]
    assert plan.evaluations == [["flickr8k", "test"]] and plan.datasets == ["coco", "flickr8k"]
    demo = tmp_path / "demo.yaml"
    demo.write_text(config_path("demo").read_text().replace("dataset: coco", "dataset: flickr8k"))
    plan = plan_for_config(str(demo), ["test"])
    assert plan.feature_splits == [["flickr8k", "train"], ["flickr8k", "val"], ["flickr8k", "test"]]
    assert plan.datasets == ["coco", "flickr8k"]  # the stand-in backbones learn from coco's captions


def test_workspace_state_key_changes_with_a_new_workspace_or_an_edited_config(tmp_path):
    policy, config = WorkspaceState(), tmp_path / "run.yaml"
    config.write_text("name: a\n")
    first = policy.compute_key(None, {"workspace": tmp_path / "ws", "config": str(config)}, {})
    assert first == policy.compute_key(None, {"workspace": tmp_path / "ws", "config": str(config)}, {})
    config.write_text("name: b\n")
    edited = policy.compute_key(None, {"workspace": tmp_path / "ws", "config": str(config)}, {})
    (tmp_path / "ws" / ".workspace-id").unlink()  # as if the workspace had been deleted and made again
    recreated = policy.compute_key(None, {"workspace": tmp_path / "ws", "config": str(config)}, {})
    assert len({first, edited, recreated}) == 3
    assert policy.compute_key(None, {"name": "x"}, {}) is None


def test_workspace_identity_is_stable_and_presets_resolve(tmp_path):
    assert workspace_identity(tmp_path) == workspace_identity(tmp_path)
    assert config_path("demo").name == "demo.yaml" and config_path("demo").exists()


def test_parent_run_id_is_left_out_of_stage_cache_keys():
    from tasks.training import STAGE_CACHE

    inputs = [p for p in STAGE_CACHE.policies if isinstance(p, WorkspaceInputs)]
    assert inputs and "parent_run_id" in inputs[0].exclude


@pytest.mark.parametrize("exception, transient", [
    (httpx.ConnectError("refused"), True),
    (httpx.ReadTimeout("slow"), True),
    (TransientFailure("cut"), True),
    (httpx.HTTPStatusError("503", request=httpx.Request("GET", "http://x"), response=httpx.Response(503)), True),
    (httpx.HTTPStatusError("404", request=httpx.Request("GET", "http://x"), response=httpx.Response(404)), False),
    (DownloadError("checksum still wrong"), False),
    (DownloadError("x.zip: could not fetch http://x/x.zip after 6 attempts ([Errno 111] Connection refused)"), False),
    (ValueError("bad config"), False),
    (RuntimeError("API request failed: Max retries exceeded with url"), True),
])
def test_only_transient_failures_are_retried(exception, transient):
    assert is_transient(exception) is transient


def test_summary_markdown_has_a_row_per_step_links_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    records = [{"step": "finetune", "cached": True, "metrics": {"best CIDEr": 0.5, "steps": 40}, "run_id": "abc123def"},
               {"step": "evaluate coco/test", "cached": False, "metrics": {"CIDEr": 0.61, "BLEU-4": 0.2}, "run_id": "f00"}]
    text = pipeline_markdown("full-pipeline (demo)", records, tmp_path, [["7", "a red circle"]], ["note"])
    assert "| finetune | cached: reused, not re-run | best CIDEr 0.500, steps 40 |" in text
    assert "| evaluate coco/test | ran | CIDEr 0.610, BLEU-4 0.200 | [f00](http://127.0.0.1:5000/#/runs/f00) |" in text
    assert "| 7 | a red circle |" in text and "- note" in text
    assert metrics_cell({}) == "—"
    assert metrics_cell({"steps": 120.0, "CIDEr": 1.974962450733877}) == "CIDEr 1.975, steps 120"
    retrained = pipeline_markdown("retrain", [{"step": "finetune", "cached": False, "already_done": True,
                                               "metrics": {}, "run_id": "r1"}], tmp_path)
    assert "| finetune | ran: the stage was already trained on these inputs; its checkpoint reused |" in retrained


# ---- cache keys follow the catalog's contents and what path inputs hold ---------------------------


def small_catalog(workspace):
    """coco train (t1, t2), val (v1) and test (e1, e2), two captions each; no image files needed."""
    from storage.catalog import Catalog
    from storage.workspace import catalog_path

    images = [(split, image_id) for split, ids in (("train", "t1 t2"), ("val", "v1"), ("test", "e1 e2"))
              for image_id in ids.split()]
    captions = [(split, image_id, 2 * n + k) for n, (split, image_id) in enumerate(images) for k in range(2)]
    with Catalog(catalog_path(workspace)) as catalog:
        catalog.replace_dataset("coco", {
            "image_id": [i for _, i in images], "split": [s for s, _ in images],
            "path": [f"/images/{i}.jpg" for _, i in images], "width": [8] * len(images),
            "height": [8] * len(images), "domain": [None] * len(images), "status": ["ok"] * len(images),
            "reason": [None] * len(images)}, {
            "image_id": [i for _, i, _ in captions], "caption_id": [c for _, _, c in captions],
            "text": [f"caption {c} of {i}" for _, i, c in captions], "split": [s for s, _, _ in captions]}, 0)


def task_keys(workspace, config, checkpoint) -> dict[str, str]:
    """The full cache key of each data-reading task, as Prefect computes it before a run."""
    from types import SimpleNamespace

    from tasks.data import build_demo_backbones
    from tasks.features import cache_feature_shard
    from tasks.training import evaluate_checkpoint, train_stage

    shard = {"workspace": workspace, "backbones": {"vision_model": "ViT-B-16"}, "shard": 0, "shard_size": 4}
    calls = {"backbones": (build_demo_backbones, {"workspace": workspace, "catalog": {}}),
             "train shard": (cache_feature_shard, {**shard, "dataset": "coco", "split": "train"}),
             "test shard": (cache_feature_shard, {**shard, "dataset": "coco", "split": "test"}),
             "training": (train_stage, {"workspace": workspace, "config": str(config), "stage": "finetune"}),
             "evaluation": (evaluate_checkpoint, {"workspace": workspace, "checkpoint": str(checkpoint),
                                                  "dataset": "coco", "split": "test"})}
    return {name: task.cache_policy.compute_key(SimpleNamespace(task=task), inputs, {})
            for name, (task, inputs) in calls.items()}


def test_cache_keys_change_with_the_catalog_contents_a_task_reads_and_only_those(tmp_path):
    from storage.catalog import Catalog
    from storage.workspace import catalog_path

    workspace, config, checkpoint = tmp_path / "ws", tmp_path / "run.yaml", tmp_path / "checkpoint"
    small_catalog(workspace)
    config.write_text("name: run\nmodel: {vision_model: ViT-B-16, vision_pretrained: openai, language_model: gpt2}\n"
                      "stages: [{name: finetune, dataset: coco, epochs: 1}]\n")
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    before = task_keys(workspace, config, checkpoint)
    assert task_keys(workspace, config, checkpoint) == before  # nothing changed: every key is the same

    def changed() -> set[str]:
        after = task_keys(workspace, config, checkpoint)
        return {name for name in before if after[name] != before[name]}

    with Catalog(catalog_path(workspace)) as catalog:  # a caption added to a training image
        catalog.connection.execute("INSERT INTO captions VALUES ('coco', 't1', 99, 'one more caption', 'train')")
    assert changed() == {"backbones", "training"}  # the shard's tokens do not depend on captions
    before = task_keys(workspace, config, checkpoint)
    with Catalog(catalog_path(workspace)) as catalog:  # a test image found unusable
        catalog.connection.execute("UPDATE images SET status = 'unreadable' WHERE split = 'test' AND image_id = 'e2'")
    assert changed() == {"test shard", "evaluation"}
    before = task_keys(workspace, config, checkpoint)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights trained again")
    assert changed() == {"evaluation"}


def test_catalog_fingerprints_are_the_feature_cache_digest_and_cover_captions(tmp_path):
    from storage.catalog import Catalog
    from pipeline.features import image_list_fingerprint
    from pipeline.data import catalog_fingerprint, split_images

    workspace = tmp_path / "ws"
    assert catalog_fingerprint(workspace, [("coco", "train")]) == "no catalog"
    small_catalog(workspace)
    with Catalog(workspace / "catalog.duckdb", read_only=True) as catalog:
        for split in ("train", "val", "test"):
            assert catalog.image_list_fingerprint("coco", split) == \
                image_list_fingerprint(split_images(workspace, "coco", split))
        assert catalog.image_list_fingerprint("coco", "nothing") == image_list_fingerprint([])
        assert catalog.split_fingerprint("coco", "train") != catalog.image_list_fingerprint("coco", "train")
    train = catalog_fingerprint(workspace, [("coco", "train")])
    assert train == catalog_fingerprint(workspace, [("coco", "train")])
    assert len({train, catalog_fingerprint(workspace, [("coco", "train")], captions=False),
                catalog_fingerprint(workspace, [("coco", "train"), ("coco", "val")])}) == 3


def test_every_task_that_keeps_its_result_stores_plain_json_read_through_checked_metadata():
    import importlib
    import pkgutil

    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    import tasks
    from tasks.caching import RESULT_SERIALIZER, ResultMetadata

    found = {value.name: value for module in pkgutil.iter_modules(tasks.__path__)
             for value in vars(importlib.import_module(f"tasks.{module.name}")).values() if isinstance(value, Task)}
    kept = [task for task in found.values() if task.persist_result or task.cache_policy not in (None, NO_CACHE)]
    assert {task.name for task in kept} >= {"write-demo-corpus", "build-catalog", "cache-feature-shard",
                                            "train-stage", "evaluate"}
    for task in kept:
        assert task.persist_result and task.result_serializer == RESULT_SERIALIZER, task.name
        assert isinstance(task.cache_policy.key_storage, ResultMetadata), task.name


def test_result_metadata_reads_only_plain_json_records(tmp_path):
    import asyncio

    from prefect.serializers import JSONSerializer, PickleSerializer
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.caching import RESULT_SERIALIZER, ResultMetadata

    def record(serializer, result_file) -> bytes:
        return json.dumps({"storage_key": str(result_file), "serializer": json.loads(serializer.model_dump_json()),
                           "expiration": None, "prefect_version": "3", "storage_block_id": None}).encode()

    (tmp_path / "good").write_text('{"coco": "manifest.json"}')
    (tmp_path / "pickled").write_bytes(b"\x80\x05K\x01.")
    storage = ResultMetadata()
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path}):
        assert storage._resolve_path("key") == tmp_path.resolve() / "metadata" / "key"
        cases = {"json": record(RESULT_SERIALIZER, tmp_path / "good"),
                 "pickle": record(PickleSerializer(picklelib="cloudpickle"), tmp_path / "good"),
                 "hooks": record(JSONSerializer(), tmp_path / "good"),  # Prefect's default JSON builds named types
                 "result not json": record(RESULT_SERIALIZER, tmp_path / "pickled"),
                 "result elsewhere": record(RESULT_SERIALIZER, Path("/dev/zero")),
                 "not a record": b"\x80\x05K\x01."}
        for name, content in cases.items():
            storage.write_path(name, content, _sync=True)
        assert storage.read_path("json", _sync=True) == cases["json"]
        assert asyncio.run(storage.aread_path("json")) == cases["json"]  # what async tasks call
        for name in ("pickle", "hooks", "result not json", "result elsewhere", "not a record"):
            with pytest.raises(ValueError, match="not a plain JSON record"):
                storage.read_path(name, _sync=True)


def test_task_inputs_inside_the_workspace_key_alike_wherever_the_workspace_lies(tmp_path):
    policy = WorkspaceInputs(exclude=("parent_run_id",))

    def key(workspace, **inputs):
        return policy.compute_key(None, {"workspace": workspace, **inputs}, {})

    first, moved = tmp_path / "a" / "ws", tmp_path / "b" / "copy"
    inputs = lambda ws: dict(backbones={"vision_model": f"local-dir:{ws}/backbones/vision", "language_model": "gpt2"},
                             checkpoint=str(ws / "runs/demo/finetune/best"), features=[str(ws / "features/x.json")])
    assert key(first, **inputs(first)) == key(moved, **inputs(moved)) == key(str(moved), **inputs(moved))
    assert key(first, **inputs(first), parent_run_id="1") == key(first, **inputs(first), parent_run_id="2")
    assert key(first, **inputs(first)) != key(first, **inputs(moved))  # a path outside the workspace is kept
    assert key(first, **inputs(first), device="cpu") != key(first, **inputs(first), device="cuda")

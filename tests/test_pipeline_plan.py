"""The plumbing's plain parts: what a config needs, cache keys, retry conditions, the summary markdown."""

import httpx
import pytest
from prefect.cache_policies import INPUTS

from storage.downloads import DownloadError, TransientFailure
from storage.pipeline_report import metrics_cell, pipeline_markdown
from tasks.caching import WorkspaceState, config_path, is_transient, workspace_identity
from tasks.plan import plan_for_config


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

    inputs = [p for p in STAGE_CACHE.policies if type(p) is type(INPUTS)]
    assert inputs and "parent_run_id" in inputs[0].exclude


@pytest.mark.parametrize("exception, transient", [
    (httpx.ConnectError("refused"), True),
    (httpx.ReadTimeout("slow"), True),
    (TransientFailure("cut"), True),
    (httpx.HTTPStatusError("503", request=httpx.Request("GET", "http://x"), response=httpx.Response(503)), True),
    (httpx.HTTPStatusError("404", request=httpx.Request("GET", "http://x"), response=httpx.Response(404)), False),
    (DownloadError("checksum still wrong"), False),
    (ValueError("bad config"), False),
    (RuntimeError("API request failed: Max retries exceeded with url"), True),
])
def test_only_transient_failures_are_retried(exception, transient):
    assert is_transient(exception) is transient


def test_summary_markdown_has_a_row_per_stage_links_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    records = [{"stage": "finetune", "cached": True, "metrics": {"best CIDEr": 0.5, "steps": 40}, "run_id": "abc123def"},
               {"stage": "evaluate coco/test", "cached": False, "metrics": {"CIDEr": 0.61, "BLEU-4": 0.2}, "run_id": "f00"}]
    text = pipeline_markdown("full-pipeline (demo)", records, tmp_path, [["7", "a red circle"]], ["note"])
    assert "| finetune | cached: reused, not re-run | best CIDEr 0.500, steps 40.000 |" in text
    assert "| evaluate coco/test | ran | CIDEr 0.610, BLEU-4 0.200 | [f00](http://127.0.0.1:5000/#/runs/f00) |" in text
    assert "| 7 | a red circle |" in text and "- note" in text
    assert metrics_cell({}) == "—"

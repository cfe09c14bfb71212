import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ituning.backbones import LOCAL_DIR
from ituning.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ituning.version import code_version
from pipeline import data, evaluation, features, presets, registry, tracking, training
from storage.catalog import Catalog
from storage.feature_cache import FeatureReader
from pipeline.tracking import PARENT_TAG, STAGE_TAG, ExperimentTracker

TINY_STAGE = {"name": "finetune", "dataset": "coco", "epochs": 2, "batch_size": 8, "micro_batch_size": 8,
              "precision": "fp32", "val_images": 4, "seed": 3, "captions": "random"}


def write_tiny_config(path, backbones="backbones", **stage):
    config = {"name": "tiny", "device": "cpu",
              "model": {"vision_model": f"local-dir:{backbones}/vision", "vision_pretrained": None,
                        "language_model": f"{backbones}/language"},
              "evaluation": {"clip_score_model": f"local-dir:{backbones}/vision", "clip_score_pretrained": None},
              "stages": [{**TINY_STAGE, **stage}]}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tracked_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return tmp_path


# ---- fast: configs, catalog errors, promotion ------------------------------------------------


def test_relative_local_backbones_are_taken_from_the_workspace(tmp_path):
    (tmp_path / "backbones" / "vision").mkdir(parents=True)
    (tmp_path / "backbones" / "language").mkdir()
    config = presets.resolve_config(str(write_tiny_config(tmp_path / "tiny.yaml")), tmp_path)
    assert config.model.vision_model == f"{LOCAL_DIR}{(tmp_path / 'backbones' / 'vision').resolve()}"
    assert config.model.language_model == str((tmp_path / "backbones" / "language").resolve())
    unchanged = presets.resolve_config("coco-gpt2", tmp_path).model  # hub names stay names
    assert (unchanged.vision_model, unchanged.vision_pretrained, unchanged.language_model) == \
        ("ViT-B-16", "openai", "gpt2")


def test_demo_preset_reads_the_catalog_and_the_workspace_backbones(tmp_path):
    config = presets.resolve_config("demo", tmp_path)  # no backbones yet: the paths stay as written
    assert config.model.vision_model == f"{LOCAL_DIR}backbones/vision"
    assert [stage.dataset for stage in config.stages] == ["coco"]


def test_unknown_stage_and_missing_catalog_are_named(tracked_workspace):
    with pytest.raises(ValueError, match="no stage 'pretrain'"):
        training.train_stage(tracked_workspace, str(write_tiny_config(tracked_workspace / "t.yaml")), "pretrain")
    with pytest.raises(FileNotFoundError, match="catalog build"):
        features.feature_shards(tracked_workspace, "coco", "train")
    with pytest.raises(ValueError, match="unknown datasets"):
        data.build_catalog(tracked_workspace, ["imagenet"])


def registered_versions(tracker, name, cider_values):
    """One registered version per value, each from a run that logged it as "coco_test/CIDEr"."""
    tracker.client.create_registered_model(name)
    versions = []
    for value in cider_values:
        run_id = tracker.start_pipeline("candidate")
        tracker.log_metrics(run_id, {"coco_test/CIDEr": value})
        tracker.finish(run_id)
        versions.append(str(tracker.client.create_model_version(name, f"runs:/{run_id}/model", run_id).version))
    return versions


def without_reason(promotion: dict) -> dict:
    assert promotion["reason"]
    return {key: value for key, value in promotion.items() if key != "reason"}


def test_champion_moves_only_to_a_better_candidate(tracked_workspace):
    tracker = ExperimentTracker(workspace=tracked_workspace)
    first, better, worse = registered_versions(tracker, "captioner", [0.5, 0.9, 0.7])
    promote = dict(metric="coco_test/CIDEr", workspace=tracked_workspace)
    assert without_reason(registry.promote_if_better("captioner", first, **promote)) == \
        {"promoted": True, "candidate": 0.5, "champion": None, "champion_version": first}
    assert without_reason(registry.promote_if_better("captioner", better, **promote)) == \
        {"promoted": True, "candidate": 0.9, "champion": 0.5, "champion_version": better}
    assert without_reason(registry.promote_if_better("captioner", worse, **promote)) == \
        {"promoted": False, "candidate": 0.7, "champion": 0.9, "champion_version": better}
    assert str(tracker.client.get_model_version_by_alias("captioner", "champion").version) == better
    tags = tracker.client.get_model_version("captioner", worse).tags
    assert {key: tags[key] for key in ("promotion.candidate", "promotion.champion", "promotion.champion_version",
                                       "promotion.promoted")} == \
        {"promotion.candidate": "0.7", "promotion.champion": "0.9", "promotion.champion_version": better,
         "promotion.promoted": "False"}
    with pytest.raises(ValueError, match="no metric 'BLEU-4'"):
        registry.promote_if_better("captioner", worse, metric="BLEU-4", workspace=tracked_workspace)


def test_a_champion_scored_on_another_task_is_not_compared(tracked_workspace):
    """A real COCO model (CIDEr about 1.2) after the demo's synthetic "coco" (about 2): scores on
    different references do not compare, so the candidate of the current task takes over."""
    tracker = ExperimentTracker(workspace=tracked_workspace)
    demo, real, real_worse = registered_versions(tracker, "captioner", [2.0, 1.2, 1.1])
    promote = dict(workspace=tracked_workspace)
    assert registry.promote_if_better("captioner", demo, "CIDEr", 2.0, task="coco/test@synthetic", **promote)["promoted"]
    taken_over = registry.promote_if_better("captioner", real, "CIDEr", 1.2, task="coco/test@real", **promote)
    assert taken_over["promoted"] and "not comparable" in taken_over["reason"]
    kept = registry.promote_if_better("captioner", real_worse, "CIDEr", 1.1, task="coco/test@real", **promote)
    assert not kept["promoted"] and kept["champion"] == 1.2 and kept["champion_version"] == real
    assert tracker.client.get_model_version("captioner", real).tags["promotion.task"] == "coco/test@real"


def test_promotion_uses_overall_cider_by_domain_and_is_skipped_without_references(tracked_workspace):
    tracker = ExperimentTracker(workspace=tracked_workspace)
    val, test = registered_versions(tracker, "captioner", [0.0, 0.0])
    by_domain = {"in-domain": {"CIDEr": 0.9}, "out-domain": {"CIDEr": 0.3}, "overall": {"CIDEr": 0.6}}
    scored = registry.promote_evaluated(tracked_workspace, "captioner", val,
                                      {"metrics": by_domain, "task": "nocaps/val@x"})
    assert scored["promoted"] and scored["candidate"] == 0.6
    assert tracker.client.get_model_version("captioner", val).tags["promotion.metric"] == "overall/CIDEr"
    skipped = registry.promote_evaluated(tracked_workspace, "captioner", test, {"metrics": {}, "task": "nocaps/test@y"})
    assert not skipped["promoted"] and "no CIDEr to compare" in skipped["reason"]
    assert str(tracker.client.get_model_version_by_alias("captioner", "champion").version) == val


def test_each_preset_registers_under_its_own_model_name():
    from pipeline.plan import plan_for_config

    assert plan_for_config("demo", ["test"]).model_name == "ituning-demo"
    assert plan_for_config("coco-gpt2-vlp", ["test"]).model_name == "ituning-coco-gpt2-vlp"


def test_a_stage_starts_from_the_callers_checkpoint_else_the_configs_else_the_stage_before(tmp_path):
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({"name": "two", "model": {"vision_model": "ViT-B-16", "language_model": "gpt2"},
                                      "stages": [{"name": "pretrain", "dataset": "vg", "epochs": 1,
                                                  "train_split": "pretrain", "val_split": None},
                                                 {"name": "finetune", "dataset": "coco", "epochs": 1}]}))
    run_config, out = presets.resolve_config(str(config), tmp_path), tmp_path / "runs" / "two"
    assert training.starting_point(run_config, "pretrain", out) is None
    with pytest.raises(FileNotFoundError, match="stage 'pretrain' has not been trained"):
        training.starting_point(run_config, "finetune", out)
    (out / "pretrain" / "final").mkdir(parents=True)
    (out / "pretrain" / "final" / WEIGHTS_FILE).write_bytes(b"weights")
    assert training.starting_point(run_config, "finetune", out) == str(out / "pretrain" / "final")
    assert training.starting_point(run_config, "finetune", out, previous="/just/trained") == "/just/trained"
    assert training.starting_point(run_config, "finetune", out, "/given", "/just/trained") == "/given"
    configured = yaml.safe_load(config.read_text())
    configured["stages"][1]["init_from"] = "/from/config"
    config.write_text(yaml.safe_dump(configured))
    run_config = presets.resolve_config(str(config), tmp_path)
    assert training.starting_point(run_config, "finetune", out, previous="/just/trained") == "/from/config"


def test_a_file_given_by_url_or_path_is_named_after_its_last_segment():
    from storage.manifests import user_file

    assert user_file("https://host/gated/flickr30k%20images.tar.gz?token=1").name == "flickr30k images.tar.gz"
    assert user_file("/data/flickr30k-images.zip").url == "/data/flickr30k-images.zip"


# ---- slow: the whole chain on a tiny synthetic workspace ---------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """corpus -> download -> catalog -> stand-ins -> feature shards -> tracked training and
    evaluation -> registry, run once for the checks below."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        workspace = tmp_path_factory.mktemp("workspace")
        manifests = data.write_demo_corpus(workspace, images=40, seed=1)
        downloaded = data.download(workspace, "coco", manifests["coco"])
        summaries = data.build_catalog(workspace, ["coco"])
        backbones = data.build_demo_backbones(workspace, vision_steps=2, language_steps=2, batch_size=16)
        entries = {}
        for split in ("train", "val", "test"):
            shards = features.feature_shards(workspace, "coco", split, shard_size=6)
            files = [features.cache_feature_shard(workspace, "coco", split, backbones, k, 6, "cpu") for k in shards]
            entries[split] = features.finish_feature_cache(workspace, "coco", split, backbones, 6, "cpu")
            assert len(shards) > 1 and all(map(lambda f: f.endswith(".h5"), files))
        parent = tracking.start_pipeline_run(workspace, "tiny-pipeline", {"config": "tiny", "seed": 3})
        trained = training.train_stage(workspace, str(write_tiny_config(workspace / "tiny.yaml")), "finetune", parent)
        evaluated = evaluation.evaluate(workspace, trained["checkpoint"], "coco", "test", parent, gallery_size=3)
        registered = registry.register_captioner(workspace, trained["checkpoint"], trained["run_id"])
        tracking.finish_pipeline_run(workspace, parent)
        yield {"workspace": workspace, "downloaded": downloaded, "summaries": summaries, "backbones": backbones,
               "entries": entries, "parent": parent, "trained": trained, "evaluated": evaluated,
               "registered": registered, "tracker": ExperimentTracker(workspace=workspace)}


@pytest.mark.slow
def test_data_stages_fill_the_catalog_and_the_feature_cache(pipeline):
    workspace = pipeline["workspace"]
    assert pipeline["downloaded"]["dataset"] == "coco" and not pipeline["downloaded"]["failures"]
    coco = pipeline["summaries"]["coco"]
    assert coco["usable"] == coco["images"] - 3  # the corpus's truncated, non-image and missing files
    with Catalog(workspace / "catalog.duckdb", read_only=True) as catalog:
        for split, entry in pipeline["entries"].items():
            reader = FeatureReader(entry)
            assert reader.attrs["image_list_fingerprint"] == catalog.image_list_fingerprint("coco", split)
            assert sorted(reader.image_ids) == [image.image_id for image in catalog.usable_images("coco", split)]
    assert pipeline["backbones"]["vision_model"] == f"{LOCAL_DIR}{workspace / 'backbones' / 'vision'}"


@pytest.mark.slow
def test_training_is_a_child_run_with_config_data_and_metrics(pipeline):
    tracker, trained, workspace = pipeline["tracker"], pipeline["trained"], pipeline["workspace"]
    run = tracker.client.get_run(trained["run_id"])
    assert run.data.tags[PARENT_TAG] == pipeline["parent"] and run.data.tags[STAGE_TAG] == "finetune"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["code_version"] == code_version() and params["seed"] == "3"
    assert params["model.language_model"] == str((workspace / "backbones" / "language").resolve())
    assert json.loads(params["stages"])[0]["epochs"] == 2
    with Catalog(workspace / "catalog.duckdb", read_only=True) as catalog:
        assert params["data.training.coco/train.fingerprint"] == catalog.image_list_fingerprint("coco", "train")
        assert params["data.validation.coco/val.fingerprint"] == catalog.image_list_fingerprint("coco", "val")
    cache = FeatureReader(pipeline["entries"]["train"]).attrs
    assert params["features.training.encoder_weights_sha256"] == cache["encoder_weights_sha256"]
    inputs = {(i.dataset.name, i.tags[0].value) for i in run.inputs.dataset_inputs}
    assert inputs == {("coco/train", "training"), ("coco/val", "validation")}
    losses = tracker.client.get_metric_history(trained["run_id"], "loss")
    assert [m.step for m in losses] == list(range(1, trained["steps"] + 1)) and trained["steps"] == 6
    assert {"lr", "captions_per_s"} <= set(run.data.metrics)
    assert [m.step for m in tracker.client.get_metric_history(trained["run_id"], "epoch/val_CIDEr")] == [0, 1]
    saved = {item.path for item in tracker.client.list_artifacts(trained["run_id"], "checkpoint")}
    assert saved == {f"checkpoint/{WEIGHTS_FILE}", f"checkpoint/{CONFIG_FILE}"}
    assert trained["checkpoint"].endswith("best") and trained["best_cider"] is not None
    again = training.train_stage(workspace, str(workspace / "tiny.yaml"), "finetune", pipeline["parent"])
    assert {key: again[key] for key in ("checkpoint", "best_cider", "steps")} == \
        {key: trained[key] for key in ("checkpoint", "best_cider", "steps")}  # a finished stage is not redone
    assert again["run_id"] != trained["run_id"]


@pytest.mark.slow
def test_a_finished_stage_is_reused_for_the_same_data_and_trained_afresh_for_changed_data(pipeline, tmp_path):
    workspace = tmp_path / "workspace"  # a copy: the catalog changes below
    shutil.copytree(pipeline["workspace"], workspace)
    config = str(write_tiny_config(workspace / "same-backbones.yaml"))  # the copy's backbones: the same ones
    tracker = ExperimentTracker(workspace=workspace)

    def trained_steps(result) -> list[int]:
        return [m.step for m in tracker.client.get_metric_history(result["run_id"], "loss")]

    reused = training.train_stage(workspace, config, "finetune")  # the fixture trained it from the same
    assert trained_steps(reused) == [] and reused["checkpoint"] == str(workspace / "runs/tiny/finetune/best")
    assert reused["trained_now"] is False  # what the summary reports as "already trained"
    with Catalog(workspace / "catalog.duckdb") as catalog:
        image_id = catalog.usable_images("coco", "train")[0].image_id
        catalog.connection.execute("INSERT INTO captions VALUES ('coco', ?, 1000000000, 'a caption added later', "
                                   "'train')", [image_id])
    changed = training.train_stage(workspace, config, "finetune")
    assert trained_steps(changed) == [1, 2, 3, 4, 5, 6]  # not the finished checkpoint of the old data
    assert changed["trained_now"] is True
    record = json.loads((Path(changed["checkpoint"]).parent / training.TRAINED_FROM).read_text())
    assert record["data"] == data.catalog_fingerprint(workspace, [("coco", "train"), ("coco", "val")])
    again = training.train_stage(workspace, config, "finetune")
    assert trained_steps(again) == [] and again["checkpoint"] == changed["checkpoint"]


@pytest.mark.slow
def test_evaluation_logs_scores_captions_gallery_and_heatmaps(pipeline):
    tracker, evaluated = pipeline["tracker"], pipeline["evaluated"]
    run = tracker.client.get_run(evaluated["run_id"])
    assert run.data.tags[PARENT_TAG] == pipeline["parent"]
    assert set(evaluated["metrics"]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert run.data.metrics["coco_test/CIDEr"] == evaluated["metrics"]["CIDEr"]
    captions = json.loads(open(evaluated["captions_path"]).read())
    with Catalog(pipeline["workspace"] / "catalog.duckdb", read_only=True) as catalog:
        assert sorted(captions) == sorted(catalog.captions("coco", "test"))
    assert evaluated["sample"][0] == [min(captions), captions[min(captions)]]
    artifacts = {item.path for folder in ("metrics", "captions", "gallery/coco_test", "heatmaps/coco_test")
                 for item in tracker.client.list_artifacts(evaluated["run_id"], folder)}
    assert {"metrics/coco_test.json", "captions/coco_test.json", "gallery/coco_test/index.html"} <= artifacts
    assert any(path.startswith("heatmaps/coco_test/") and path.endswith(".png") for path in artifacts)
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"coco/test"}
    assert_clip_scores_logged(tracker, evaluated, captions, pipeline["workspace"] / "backbones" / "vision")


def assert_clip_scores_logged(tracker, evaluated, captions, clip_folder):
    """CLIP-S and RefCLIP-S beside the COCO metrics (the run config's CLIP: the stand-in), their
    per-image values as an artifact and in each gallery row."""
    from mlflow.artifacts import download_artifacts

    run = tracker.client.get_run(evaluated["run_id"])
    assert run.data.params["clip_score.clip_score_model"] == f"{LOCAL_DIR}{clip_folder.resolve()}"
    for name in ("CLIP-S", "RefCLIP-S"):
        assert 0 <= evaluated["metrics"][name] <= 2.5 and run.data.metrics[f"coco_test/{name}"] == \
            pytest.approx(evaluated["metrics"][name])
    folder = Path(download_artifacts(run_id=evaluated["run_id"], artifact_path="", tracking_uri=tracker.uri))
    per_image = json.loads((folder / "clip_scores" / "coco_test.json").read_text())
    assert sorted(per_image) == sorted(captions)
    assert evaluated["metrics"]["CLIP-S"] == pytest.approx(sum(row["CLIP-S"] for row in per_image.values())
                                                          / len(per_image))
    page = (folder / "gallery" / "coco_test" / "index.html").read_text()
    shown = sorted(captions)[:3]  # gallery_size=3
    assert page.count('class="scores"') == 3
    for image_id in shown:
        row = next(part for part in page.split("<tr>") if f'alt="{image_id}"' in part)
        assert f"CLIP-S {per_image[image_id]['CLIP-S']:.3f} · RefCLIP-S {per_image[image_id]['RefCLIP-S']:.3f}" in row


@pytest.mark.slow
def test_clip_scores_can_be_turned_off_and_are_left_out_with_a_note_when_unavailable(pipeline):
    import os
    import subprocess
    import sys

    from ituning.config import EvaluationSettings

    workspace, checkpoint = pipeline["workspace"], pipeline["trained"]["checkpoint"]
    off = evaluation.evaluate(workspace, checkpoint, "coco", "test", gallery_size=1, num_beams=1,
                              scoring=EvaluationSettings(clip_score_model=None))
    assert "CIDEr" in off["metrics"] and not {"CLIP-S", "RefCLIP-S"} & set(off["metrics"]) and off["notes"] == []
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_TRACKING")}
    missing = subprocess.run(
        [Path(sys.executable).with_name("ituning"), "evaluate", "--checkpoint", checkpoint, "--split", "test",
         "--workspace", str(workspace), "--beams", "1", "--device", "cpu",
         "--clip-model", f"{LOCAL_DIR}{workspace / 'no-such-clip'}"], capture_output=True, text=True, env=environment)
    assert missing.returncode == 0, missing.stderr
    metrics = json.loads(missing.stdout.split("\ncaptions: ")[0])
    assert "CIDEr" in metrics and "CLIP-S" not in metrics
    assert "note: CLIP-S and RefCLIP-S left out" in missing.stderr and "no open_clip_config.json" in missing.stderr
    run_id = missing.stdout.rsplit("(MLflow run ", 1)[1].split(")")[0]
    assert "CLIP-S and RefCLIP-S left out" in pipeline["tracker"].client.get_run(run_id).data.tags["ituning.notes"]


def retrained_copy(checkpoint: str, destination: Path) -> Path:
    """The checkpoint with other module weights, as another training would leave it."""
    from safetensors.torch import load_file, save_file

    from ituning.checkpoint import FORMAT

    shutil.copytree(checkpoint, destination)
    weights = load_file(destination / WEIGHTS_FILE)
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, destination / WEIGHTS_FILE, metadata={"format": FORMAT})
    return destination


@pytest.mark.slow
def test_registered_captioner_is_promoted_only_when_better(pipeline):
    tracker, registered, workspace = pipeline["tracker"], pipeline["registered"], pipeline["workspace"]
    assert registered["version"] == "1" and registered["model_uri"] == f"runs:/{pipeline['trained']['run_id']}/model"
    cider = pipeline["evaluated"]["metrics"]["CIDEr"]
    first = registry.promote_if_better(registered["name"], registered["version"], value=cider, workspace=workspace)
    assert without_reason(first) == {"promoted": True, "candidate": cider, "champion": None, "champion_version": "1"}
    same = registry.register_captioner(workspace, pipeline["trained"]["checkpoint"], pipeline["trained"]["run_id"])
    assert (same["version"], same["new_version"]) == ("1", False)  # the same weights are not registered twice
    again = registry.promote_if_better(same["name"], same["version"], value=cider, workspace=workspace)
    assert not again["promoted"] and again["reason"] == "version 1 is the champion already"
    other = retrained_copy(pipeline["trained"]["checkpoint"], workspace / "retrained")
    second = registry.register_captioner(workspace, other, pipeline["trained"]["run_id"])
    assert (second["version"], second["new_version"]) == ("2", True)
    worse = registry.promote_if_better(second["name"], second["version"], value=cider - 0.1, workspace=workspace)
    assert without_reason(worse) == \
        {"promoted": False, "candidate": cider - 0.1, "champion": cider, "champion_version": "1"}
    assert str(tracker.client.get_model_version_by_alias(registered["name"], "champion").version) == "1"
    assert tracker.client.get_model_version(second["name"], second["version"]).tags["promotion.promoted"] == "False"
    parent = tracker.client.get_run(pipeline["parent"])
    assert parent.info.status == "FINISHED" and parent.data.params["seed"] == "3"


@pytest.mark.slow
def test_train_command_runs_every_stage_from_the_catalog_tracked(pipeline):
    from cli.main import app

    workspace, tracker = pipeline["workspace"], pipeline["tracker"]
    config = write_tiny_config(workspace / "cli.yaml", epochs=1, val_split=None)
    stage_runs = "tags.`ituning.stage` = 'finetune'"
    before = {run.info.run_id for run in tracker.client.search_runs([tracker.experiment_id], stage_runs)}
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--workspace", str(workspace),
                                      "--out", str(workspace / "cli-run"), "--fresh"])
    assert result.exit_code == 0, result.output
    assert "finetune: modules at" in result.output and "MLflow run" in result.output
    assert (workspace / "cli-run" / "finetune" / "final" / WEIGHTS_FILE).is_file()
    [run] = [run for run in tracker.client.search_runs([tracker.experiment_id], stage_runs)
             if run.info.run_id not in before]
    assert run.info.status == "FINISHED" and run.info.run_id in result.output
    assert tracker.client.get_run(run.data.tags[PARENT_TAG]).info.status == "FINISHED"


@pytest.mark.slow
def test_a_process_other_than_rank_0_trains_without_tracking_or_writing(pipeline, monkeypatch):
    """Under torchrun every process runs train_stage; rank 0 alone tracks and writes checkpoints."""
    workspace, tracker = pipeline["workspace"], pipeline["tracker"]
    config = write_tiny_config(workspace / "rank1.yaml", epochs=1, val_split=None)
    before = {run.info.run_id for run in tracker.client.search_runs([tracker.experiment_id])}
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it, read before the process group is joined
    result = training.train_stage(workspace, str(config), "finetune", out_dir=str(workspace / "rank1-run"))
    assert result["run_id"] is None and result["steps"] == 3
    assert result["checkpoint"] == str(workspace / "rank1-run" / "finetune" / "final")  # where rank 0 writes
    assert not (workspace / "rank1-run" / "finetune").exists()
    assert {run.info.run_id for run in tracker.client.search_runs([tracker.experiment_id])} == before



@pytest.mark.slow
def test_nocaps_is_scored_by_domain_and_its_test_split_written_for_the_server(pipeline, tmp_path):
    from mlflow.artifacts import download_artifacts

    workspace, tracker, checkpoint = pipeline["workspace"], pipeline["tracker"], pipeline["trained"]["checkpoint"]
    manifest = workspace / "synthetic" / "manifests" / "nocaps.json"
    assert data.download(workspace, "nocaps", str(manifest))["images"] == 80
    assert data.build_catalog(workspace, ["nocaps"])["nocaps"]["by_split"] == {"val": 40, "test": 40}
    for split in ("val", "test"):
        features.finish_feature_cache(workspace, "nocaps", split, pipeline["backbones"], device="cpu")
    val = evaluation.evaluate(workspace, checkpoint, "nocaps", "val", gallery_size=2, num_beams=2)
    assert set(val["metrics"]) == {"in-domain", "near-domain", "out-domain", "overall"}
    assert {"CLIP-S", "RefCLIP-S"} <= set(val["metrics"]["overall"])  # overall only: not per domain
    assert "CLIP-S" not in val["metrics"]["in-domain"]
    assert tracker.client.get_run(val["run_id"]).data.metrics["nocaps_val/out-domain/CIDEr"] == \
        val["metrics"]["out-domain"]["CIDEr"]
    assert val["notes"] == [] and "ituning.notes" not in tracker.client.get_run(val["run_id"]).data.tags
    with Catalog(workspace / "catalog.duckdb") as catalog:  # val image info as NoCaps ships it: no domains
        catalog.connection.execute("UPDATE images SET domain = NULL WHERE dataset = 'nocaps' AND split = 'val'")
    unknown = evaluation.evaluate(workspace, checkpoint, "nocaps", "val", gallery_size=0, num_beams=1)
    assert set(unknown["metrics"]) == {"overall"} and "domains unknown for all 40 images" in unknown["notes"][0]
    assert registry.promotion_metric(unknown["metrics"]) == ("overall/CIDEr", unknown["metrics"]["overall"]["CIDEr"])
    test = evaluation.evaluate(workspace, checkpoint, "nocaps", "test", gallery_size=2, num_beams=2)
    assert test["metrics"] == {} and "no public references" in test["notes"][0]
    assert "evaluation server's format" in tracker.client.get_run(test["run_id"]).data.tags["ituning.notes"]
    folder = download_artifacts(run_id=test["run_id"], artifact_path="submission", dst_path=str(tmp_path),
                                tracking_uri=tracker.uri)
    submission = json.loads((tmp_path / "submission" / "nocaps_test_submission.json").read_text())
    assert folder and [entry["image_id"] for entry in submission] == list(range(40, 80))
    assert all(isinstance(entry["caption"], str) for entry in submission)


@pytest.mark.slow
def test_a_later_stage_trained_by_the_pipeline_is_kept_when_retrained_without_a_starting_point(pipeline, tmp_path):
    """full-pipeline hands the fine-tuning the pre-training's checkpoint; retrain and the finetune flow
    name none and find the same one in the run folder, so neither deletes what the other trained."""
    workspace, tracker = pipeline["workspace"], pipeline["tracker"]
    config = tmp_path / "two-stage.yaml"
    write_tiny_config(config, backbones=workspace / "backbones", epochs=1)
    two = yaml.safe_load(config.read_text())
    two["name"] = "two-stage"
    two["stages"] = [{**two["stages"][0], "name": "pretrain", "val_split": None}, two["stages"][0]]
    config.write_text(yaml.safe_dump(two))
    pretrained = training.train_stage(workspace, str(config), "pretrain")
    finetuned = training.train_stage(workspace, str(config), "finetune", previous=pretrained["checkpoint"])
    record = json.loads((workspace / "runs/two-stage/finetune" / training.TRAINED_FROM).read_text())
    assert record["init_from"] == data.content_digest(pretrained["checkpoint"])
    again = training.train_stage(workspace, str(config), "finetune")
    assert again["checkpoint"] == finetuned["checkpoint"]
    assert tracker.client.get_metric_history(again["run_id"], "loss") == []  # reused, not trained afresh
    recorded = json.loads((workspace / "runs/two-stage/config.json").read_text())
    assert [stage["name"] for stage in recorded["stages"]] == ["pretrain", "finetune"]


@pytest.mark.slow
def test_a_checkpoint_of_the_synthetic_corpus_and_stand_ins_is_pushed_with_a_card_that_says_so(pipeline, tmp_path):
    """`ituning push --run` of the pipeline's checkpoint, later and from another process, against the
    loopback hub: the card tells the synthetic corpus catalogued as "coco" and the stand-in backbones
    from what the checkpoint and the runs recorded, and names the CLIP that scored CLIP-S. The
    repository existed, public: `--private` makes it private."""
    import subprocess
    import sys

    import httpx
    from huggingface_hub import ModelCard

    from tests.hub_server import HubServer, hub_environment

    workspace, checkpoint = pipeline["workspace"], pipeline["trained"]["checkpoint"]
    recorded = json.loads((Path(checkpoint) / CONFIG_FILE).read_text())["provenance"]
    assert recorded == {"data": [{"dataset": "coco", "split": "train", "synthetic": True},
                                 {"dataset": "coco", "split": "val", "synthetic": True}],
                        "standin_backbones": True, "license": "apache-2.0"}
    evaluation_params = pipeline["tracker"].client.get_run(pipeline["evaluated"]["run_id"]).data.params
    assert evaluation_params["data.evaluation.coco/test.synthetic"] == "true"
    assert (evaluation_params["decoding.num_beams"], evaluation_params["decoding.max_length"]) == ("5", "20")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "README.md").write_text("an earlier upload\n")
    with HubServer() as hub:
        hub.add_repo("user/demo", tmp_path / "old")  # public
        hub_env = hub_environment(hub.endpoint, tmp_path / "hf", token="hf_x")
        environment = {key: value for key, value in hub_env.items() if not key.startswith("MLFLOW_TRACKING")}
        pushed = subprocess.run([Path(sys.executable).with_name("ituning"), "push", checkpoint, "user/demo", "--run",
                                 pipeline["parent"], "--workspace", str(workspace), "--private"],
                                capture_output=True, text=True, env=environment, cwd=tmp_path)
        assert pushed.returncode == 0, pushed.stderr
        assert "user/demo" in hub.private
        assert httpx.get(f"{hub.endpoint}/api/models/user/demo").status_code == 401  # hidden without a token
        card = ModelCard(hub.repos["user/demo"].files["README.md"].location.read_text())
    data = card.data
    assert data.datasets is None and data.license == "apache-2.0"  # no real data set to name
    assert {"synthetic-data", "standin-backbones"} <= set(data.tags) and data.base_model is None
    assert {result.dataset_type for result in data.eval_results} == {"synthetic"}
    assert {result.dataset_name for result in data.eval_results} == {"synthetic (COCO format)"}
    clip = {result.metric_name for result in data.eval_results if result.metric_type == "clip-s"}
    assert clip == {f"CLIP-S, by the stand-in CLIP {LOCAL_DIR}{(workspace / 'backbones' / 'vision').resolve()}"}
    assert "COCO (Karpathy splits)" not in card.text
    assert "**Synthetic data.**" in card.text and "**Stand-in backbones.**" in card.text
    assert "| synthetic (COCO format) | train | training |" in card.text

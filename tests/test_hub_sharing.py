"""Sharing a captioner like a Hugging Face model: save_pretrained / from_pretrained / push_to_hub, the
model card, `ituning push` and `ituning caption --model hub:REPO`, against the loopback hub of
tests/hub_server.py. huggingface_hub reads HF_ENDPOINT when imported, so what talks to the hub runs in
a child process with HF_ENDPOINT on the loopback hub, a fresh HF_HOME and a token."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from ituning.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ituning.decoding import DecodingConfig
from pipeline.model_card import (CARD_FILE, CardFacts, DatasetUse, HubError, RunRecord, Score, hub_repo_id,
                                model_card)
from pipeline.model_sources import ModelSource, card_names, model_source
from tests.hub_server import HubServer, hub_environment

ROOT = Path(__file__).resolve().parents[1]
ITUNING = Path(sys.executable).with_name("ituning")
TOKEN = "hf_loopback_token"  # any value: the loopback hub wants one for writes, as the hub does
SHARED_SUFFIXES = {".safetensors", ".json", ".md"}
QUICK = ["--beams", "2", "--max-length", "6", "--device", "cpu"]


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture
def image_file(tmp_path) -> Path:
    from tests.scene_images import shape_image

    path = tmp_path / "red circle.png"
    shape_image("red", "circle").save(path)
    return path


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def ituning(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(ITUNING), *args], capture_output=True, text=True, env=env, cwd=ROOT)


def hub_files(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    return {path: file.location.read_bytes() for path, file in hub.at_revision(repo_id, revision).files.items()}


# ---- a folder, no hub -------------------------------------------------------------------------


def test_save_pretrained_then_from_pretrained_gives_the_same_weights_and_captions(standin_checkpoint, image_file,
                                                                                  tmp_path):
    from ituning.model import count_trainable
    from pipeline.sharing import Captioner

    captioner = Captioner.from_checkpoint(standin_checkpoint, device="cpu")
    folder = captioner.save_pretrained(tmp_path / "shared")
    assert sorted(path.name for path in folder.iterdir()) == sorted([CARD_FILE, CONFIG_FILE, WEIGHTS_FILE])
    assert (folder / WEIGHTS_FILE).read_bytes() == (standin_checkpoint / WEIGHTS_FILE).read_bytes()

    loaded = Captioner.from_pretrained(folder, device="cpu")
    saved, restored = captioner.model.ituning_state_dict(), loaded.model.ituning_state_dict()
    assert saved.keys() == restored.keys()
    for key in saved:
        torch.testing.assert_close(restored[key], saved[key], rtol=0, atol=0)
    decoding = DecodingConfig(num_beams=2, max_length=6)
    assert loaded.caption_files([image_file], decoding) == captioner.caption_files([image_file], decoding)
    with torch.no_grad():  # the comparison means something: these modules change the caption
        for tensor in loaded.model.ituning_state_dict().values():
            tensor.zero_()
    assert loaded.caption_files([image_file], decoding) != captioner.caption_files([image_file], decoding)
    card = (folder / CARD_FILE).read_text()
    assert f"| trainable parameters | {count_trainable(captioner.model):,} |" in card
    assert front_matter(card)["pipeline_tag"] == "image-to-text"


# ---- the card ---------------------------------------------------------------------------------

PAPER_CONFIG = {  # adapter_config.json of I-Tuning on GPT-2 and ViT-B-16 (OpenAI weights)
    "format": "ituning-adapter/1",
    "backbones": {"vision_model": "ViT-B-16", "vision_pretrained": "openai", "language_model": "gpt2"},
    "ituning": {"bottleneck": 384, "scale": 4.0, "scale_attention": True, "zero_init_output": True, "drop_first": 0},
    "architecture": {"language_model_layers": 12, "language_model_width": 768, "vocab_size": 50257,
                     "visual_width": 768, "module_layers": list(range(12))},
    "code_version": "0.1.0+g0123456789ab",
}
RECORD = RunRecord("a1b2c3", (DatasetUse("coco", "train", "training"), DatasetUse("coco", "val", "validation"),
                              DatasetUse("coco", "test", "evaluation"), DatasetUse("nocaps", "val", "evaluation")),
                   (Score("coco", "test", "BLEU-4", 0.3512), Score("coco", "test", "CIDEr", 1.1731),
                    Score("nocaps", "val", "CIDEr", 0.7712, "overall")), card_names())


def test_the_card_names_base_models_parameters_data_sets_and_scores_in_yaml_the_hub_reads():
    card = model_card(CardFacts(PAPER_CONFIG, 14_178_816, "user/ituning-coco", record=RECORD))
    data = ModelCard(card).data
    assert data.library_name == "ituning" and data.pipeline_tag == "image-to-text"
    assert data.base_model == ["openai-community/gpt2", "timm/vit_base_patch16_clip_224.openai"]
    assert {"image-captioning", "i-tuning"} <= set(data.tags)
    assert data.datasets == ["coco", "nocaps"] and data.metrics == ["bleu-4", "cider"]
    results = {(result.dataset_type, result.dataset_split, result.metric_name): result.metric_value
               for result in data.eval_results}
    assert results == {("coco", "test", "BLEU-4"): 0.3512, ("coco", "test", "CIDEr"): 1.1731,
                       ("nocaps", "val", "CIDEr (overall)"): 0.7712}
    assert front_matter(card)["model-index"][0]["name"] == "ituning-coco"  # plain YAML too
    for text in ("| trainable parameters | 14,178,816 |", "12 of 12 layers, r = 384, λ = 4.0",
                 "| COCO (Karpathy splits) | train | training |", "| COCO (Karpathy splits) | test | CIDEr | 1.1731 |",
                 'Captioner.from_pretrained("user/ituning-coco")', "beam search with 5 beams", "MLflow run `a1b2c3`",
                 "ituning caption --model hub:user/ituning-coco image.jpg"):
        assert text in card, text


def test_a_card_on_local_backbones_names_them_and_claims_no_hub_base_model(standin_backbones, standin_checkpoint):
    config = json.loads((standin_checkpoint / CONFIG_FILE).read_text())
    card = model_card(CardFacts(config, 1234, "user/tiny"))
    data = ModelCard(card).data
    assert data.base_model is None and data.datasets is None and data.eval_results is None
    assert standin_backbones.language_model in card and "were local folders" in card
    assert "## Results" not in card and "## Data" not in card  # nothing known, nothing claimed
    assert "standin-backbones" in data.tags and "**Stand-in backbones.**" in card  # their folders say so
    assert "records no provenance" in card and data.license == "apache-2.0"


def test_a_card_of_real_data_and_backbones_names_them_their_licences_and_the_clip_of_clip_s():
    provenance = {"data": [{"dataset": "vg", "split": "pretrain", "synthetic": False},
                           {"dataset": "coco", "split": "train", "synthetic": False}],
                  "standin_backbones": False, "license": "mit"}
    clip_s = Score("coco", "test", "CLIP-S", 0.7712, scored_by="ViT-B-32 (openai)")
    record = RunRecord("a1b2c3", scores=RECORD.scores + (clip_s,), dataset_names=card_names())
    card = model_card(CardFacts({**PAPER_CONFIG, "provenance": provenance}, 14_178_816, "user/ituning-coco",
                                record=record))
    data = ModelCard(card).data
    assert data.datasets == ["vg", "coco", "nocaps"] and data.license == "mit"
    assert not {"synthetic-data", "standin-backbones"} & set(data.tags)
    assert {result.dataset_name for result in data.eval_results} == {"COCO (Karpathy splits)", "NoCaps"}
    assert "CLIP-S, by ViT-B-32 (openai)" in {result.metric_name for result in data.eval_results}
    for text in ("| Visual Genome region descriptions | pretrain | training |", "`mit`",
                 "GPT-2 (`openai-community/gpt2`) under MIT", "OpenAI (`ViT-B-16`, `openai`) under MIT",
                 "| COCO (Karpathy splits) | test | CLIP-S, by ViT-B-32 (openai) | 0.7712 |"):
        assert text in card, text
    assert "synthetic" not in card.lower() and "stand-in" not in card.lower()


# ---- model specs and repository ids -----------------------------------------------------------


def test_a_model_spec_names_a_folder_the_registry_or_the_hub(standin_checkpoint):
    assert model_source(str(standin_checkpoint)) == ModelSource("folder", str(standin_checkpoint))
    assert model_source("models:/ituning-captioner/3") == ModelSource("registry", "models:/ituning-captioner/3")
    assert model_source("runs:/0123abcd/model") == ModelSource("registry", "runs:/0123abcd/model")
    assert model_source("ituning-captioner@champion") == ModelSource("registry", "models:/ituning-captioner@champion")
    assert model_source("hub:user/tiny") == ModelSource("hub", "user/tiny")
    assert model_source("hub:user/tiny@dev") == ModelSource("hub", "user/tiny", "dev")
    for wrong in ("no/such/folder", "hub:", "hub:@dev"):
        with pytest.raises(ValueError, match="hub:|no such checkpoint folder"):
            model_source(wrong)


def test_a_bad_repository_id_is_refused_before_anything_is_sent():
    assert hub_repo_id("user/tiny-captioner.v2") == "user/tiny-captioner.v2"
    for wrong in ("bad repo!!", "a/b/c", "user/--x", ""):
        with pytest.raises(HubError, match="is not a hub repository id"):
            hub_repo_id(wrong)


# ---- through the hub --------------------------------------------------------------------------

PYTHON_USER = """
import json, sys
from ituning.decoding import DecodingConfig
from pipeline.model_card import RunRecord, Score
from pipeline.sharing import Captioner

checkpoint, image = sys.argv[1:3]
decoding = DecodingConfig(num_beams=2, max_length=6)
captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
commit = captioner.push_to_hub("user/tiny-captioner", RunRecord(scores=(Score("coco", "test", "CIDEr", 0.5),)))
branch = captioner.push_to_hub("user/tiny-captioner", revision="dev")
report = {"commit": commit, "repo_url": commit.repo_url, "branch_commit": branch.oid,
          "pushed": captioner.caption_files([image], decoding)[0][1]}
for revision in (None, "dev"):
    loaded = Captioner.from_pretrained("user/tiny-captioner", device="cpu", revision=revision)
    report[f"loaded@{revision}"] = loaded.caption_files([image], decoding)[0][1]
for repo in ("user/elsewhere", "user/missing"):
    try:
        Captioner.from_pretrained(repo, device="cpu")
    except Exception as error:
        report[repo] = [type(error).__name__, str(error)]
print(json.dumps(report))
"""


def elsewhere_repo(checkpoint: Path, folder: Path) -> Path:
    """A model trained on another machine's local stand-ins, with a pickle beside it that must never be fetched."""
    folder.mkdir()
    config = json.loads((checkpoint / CONFIG_FILE).read_text())
    config["backbones"] = {"vision_model": "local-dir:/elsewhere/vision", "vision_pretrained": None,
                           "language_model": "/elsewhere/language"}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    shutil.copyfile(checkpoint / WEIGHTS_FILE, folder / WEIGHTS_FILE)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not to be unpickled")
    return folder


@pytest.mark.slow
def test_push_to_hub_then_from_pretrained_in_a_fresh_cache_gives_the_same_captions(hub, standin_checkpoint,
                                                                                   image_file, tmp_path):
    hub.add_repo("user/elsewhere", elsewhere_repo(standin_checkpoint, tmp_path / "elsewhere"))
    hf_home = tmp_path / "fresh-hf-home"
    done = subprocess.run([sys.executable, "-c", PYTHON_USER, str(standin_checkpoint), str(image_file)], cwd=ROOT,
                          env=hub_environment(hub.endpoint, hf_home, token=TOKEN), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    main = hub.repos["user/tiny-captioner"]
    assert report["repo_url"] == f"{hub.endpoint}/user/tiny-captioner"
    assert report["commit"] == f"{hub.endpoint}/user/tiny-captioner/commit/{main.commit}"
    assert report["pushed"] and report["loaded@None"] == report["loaded@dev"] == report["pushed"]
    for revision in ("main", "dev"):
        files = hub_files(hub, "user/tiny-captioner", revision)
        assert sorted(files) == sorted([CARD_FILE, CONFIG_FILE, WEIGHTS_FILE])  # no pickle, nothing else
        assert files[WEIGHTS_FILE] == (standin_checkpoint / WEIGHTS_FILE).read_bytes()
    assert hub.at_revision("user/tiny-captioner", "dev").commit == report["branch_commit"]
    card = ModelCard(hub_files(hub, "user/tiny-captioner")[CARD_FILE].decode())
    assert card.data.eval_results[0].metric_value == 0.5 and "hub:user/tiny-captioner" in card.text

    snapshot = hf_home / "hub" / "models--user--tiny-captioner" / "snapshots" / main.commit
    assert sorted(path.name for path in snapshot.iterdir()) == sorted([CARD_FILE, CONFIG_FILE, WEIGHTS_FILE])
    assert (snapshot / WEIGHTS_FILE).read_bytes() == (standin_checkpoint / WEIGHTS_FILE).read_bytes()

    kind, message = report["user/elsewhere"]
    assert kind == "BackboneUnavailable" and "/elsewhere/language" in message and "\n" not in message
    assert not any(".bin" in path for _, _, path in hub.requests)  # the pickle was never asked for
    assert report["user/missing"][0] == "HubError" and "no model repository user/missing" in report["user/missing"][1]


def tracked_run(workspace: Path, catalog: Path) -> str:
    """A pipeline run with a training stage and an evaluation, as the pipeline records them."""
    from pipeline.tracking import ExperimentTracker

    tracker = ExperimentTracker(workspace=workspace)
    with tracker.pipeline_run("share") as parent:
        with tracker.step_run(parent, "finetune", stage="finetune") as run_id:
            tracker.log_dataset(run_id, "coco/train", "f" * 64, catalog, "training", images=8)
            tracker.log_metrics(run_id, {"train_loss": 2.5, "epoch/CIDEr": 0.1})
        with tracker.step_run(parent, "evaluate-coco-test") as run_id:
            tracker.log_dataset(run_id, "coco/test", "e" * 64, catalog, "evaluation", images=4)
            tracker.log_evaluation(run_id, "coco_test", {"0": "a red circle"},
                                   {"CIDEr": 0.25, "BLEU-4": 0.125, "blind": {"CIDEr": 0.01}})
    return parent


@pytest.mark.slow
def test_ituning_push_then_caption_from_the_hub_prints_the_checkpoints_caption(hub, standin_checkpoint, image_file,
                                                                               tmp_path):
    workspace, catalog = tmp_path / "ws", tmp_path / "catalog.duckdb"
    catalog.touch()
    run_id = tracked_run(workspace, catalog)
    environment = {key: value for key, value in hub_environment(hub.endpoint, tmp_path / "hf-home", token=TOKEN).items()
                   if not key.startswith("MLFLOW_TRACKING")}

    pushed = ituning("push", str(standin_checkpoint), "user/tiny", "--run", run_id, "--workspace", str(workspace),
                     "--private", env=environment)
    assert (pushed.returncode, pushed.stdout) == (0, f"{hub.endpoint}/user/tiny\n"), pushed.stderr
    assert "user/tiny" in hub.private
    files = hub_files(hub, "user/tiny")
    assert {Path(path).suffix for path in files} <= SHARED_SUFFIXES
    data = ModelCard(files[CARD_FILE].decode()).data
    assert data.datasets == ["coco"]
    assert {(result.metric_name, result.metric_value) for result in data.eval_results} == {("BLEU-4", 0.125),
                                                                                          ("CIDEr", 0.25)}

    from_hub = ituning("caption", str(image_file), "--model", "hub:user/tiny", *QUICK, env=environment)
    from_folder = ituning("caption", str(image_file), "--checkpoint", str(standin_checkpoint), *QUICK, env=environment)
    assert from_hub.returncode == 0, from_hub.stderr
    assert from_hub.stdout == from_folder.stdout and from_hub.stdout.startswith(f"{image_file}\t")


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_push_fails_on_one_line_for_a_bad_id_no_token_or_an_unreachable_hub(hub, standin_checkpoint, tmp_path):
    environment = hub_environment(hub.endpoint, tmp_path / "hf-home", token=TOKEN)
    bad_id = ituning("push", str(standin_checkpoint), "bad repo!!", env=environment)
    assert bad_id.returncode == 2 and "'bad repo!!' is not a hub repository id" in one_error_line(bad_id)

    no_token = ituning("push", str(standin_checkpoint), "user/tiny", env=hub_environment(hub.endpoint, tmp_path / "h"))
    assert no_token.returncode == 1 and "no Hugging Face token" in one_error_line(no_token)

    unreachable = hub_environment("http://127.0.0.1:9", tmp_path / "hf-home", token=TOKEN)  # nothing listens there
    down = ituning("push", str(standin_checkpoint), "user/tiny", env=unreachable)
    assert down.returncode == 1 and "cannot be reached" in one_error_line(down)
    assert [method for _, method, _ in hub.requests if method in ("POST", "PUT")] == []

    missing = ituning("caption", str(ROOT / "README.md"), "--model", "hub:user/missing", *QUICK, env=environment)
    assert missing.returncode != 0 and "no model repository user/missing" in one_error_line(missing)


import json

import yaml
from typer.testing import CliRunner

from cli.main import app
from storage.synthetic import unpack_karpathy_coco, write_corpus

runner = CliRunner()


def write_karpathy_corpus(folder):
    """A Karpathy-format corpus of 15 synthetic COCO images (9 of them in train)."""
    return unpack_karpathy_coco(write_corpus(folder, images=15, size=32, with_defects=False))


def write_config(path, backbones, **stage):
    config = {
        "name": "cli", "device": "cpu",
        "model": {"vision_model": backbones.vision_model, "vision_pretrained": None,
                  "language_model": backbones.language_model},
        "stages": [{"name": "finetune", "dataset": "coco", "epochs": 1, "batch_size": 8, "micro_batch_size": 8,
                    "precision": "fp32", "val_split": None, **stage}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_command_runs_a_config_on_a_karpathy_corpus(standin_backbones, tmp_path):
    corpus = write_karpathy_corpus(tmp_path / "corpus")
    config = write_config(tmp_path / "run.yaml", standin_backbones)
    result = runner.invoke(app, ["train", "--config", str(config), "--karpathy-json", str(corpus),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "finetune: modules at" in result.output
    assert (tmp_path / "run" / "finetune" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "finetune" / "last" / "trainer_state.json").is_file()
    config = json.loads((tmp_path / "run" / "finetune" / "final" / "adapter_config.json").read_text())
    assert config["provenance"] == {"data": [{"dataset": "coco", "split": "train", "synthetic": True}],
                                    "standin_backbones": True, "license": "apache-2.0"}  # as the files said


def test_train_command_reports_a_bad_config_key(standin_backbones, tmp_path):
    config = write_config(tmp_path / "run.yaml", standin_backbones, epochs=-2)
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "stages[0].epochs: must be positive" in result.output


def test_train_command_without_a_catalog_says_what_to_build(standin_backbones, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = write_config(tmp_path / "run.yaml", standin_backbones, dataset="coco")
    result = runner.invoke(app, ["train", "--config", str(config), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "no catalog at" in result.output and "catalog build" in result.output


def test_train_command_under_torchrun_asks_for_the_feature_cache_first(standin_backbones, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each of its processes
    monkeypatch.setenv("RANK", "0")
    config = write_config(tmp_path / "run.yaml", standin_backbones, dataset="coco", val_split="val")
    result = runner.invoke(app, ["train", "--config", str(config), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "no feature cache for coco/train, coco/val" in result.output
    assert "ituning features --dataset" in result.output and not (tmp_path / "ws").exists()


def test_standins_command_writes_backbones_the_normal_loaders_read(tmp_path):
    from ituning.backbones import BackboneSpec, load_language_model, load_vision_encoder

    corpus = write_karpathy_corpus(tmp_path / "corpus")
    result = runner.invoke(app, ["standins", "--karpathy-json", str(corpus), "--out", str(tmp_path / "bb"),
                                 "--vision-steps", "2", "--language-steps", "2"])
    assert result.exit_code == 0, result.output
    assert f"vision_model: local-dir:{tmp_path / 'bb' / 'vision'}" in result.output
    encoder = load_vision_encoder(BackboneSpec(f"local-dir:{tmp_path / 'bb' / 'vision'}", None))
    model, tokenizer = load_language_model(str(tmp_path / "bb" / "language"))
    assert encoder.width == 128 and model.config.vocab_size == len(tokenizer) > 256


def test_train_takes_setting_overrides_checked_like_the_file(standin_backbones, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    corpus = write_karpathy_corpus(tmp_path / "corpus")
    config = write_config(tmp_path / "run.yaml", standin_backbones)
    ituning = [str(Path(sys.executable).with_name("ituning")), "train", "--config", str(config),
               "--karpathy-json", str(corpus), "--out", str(tmp_path / "run"), "--workspace", str(tmp_path / "ws")]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_TRACKING")}
    refused = subprocess.run([*ituning, "--set", "stages[0].epochs=0"], capture_output=True, text=True,
                             env=environment)
    assert refused.returncode == 2 and refused.stderr.strip() == f"error: {config}: stages[0].epochs: must be " \
                                                                 f"positive, got 0"
    result = subprocess.run([*ituning, "--set", "stages[0].epochs=2", "--set", "stages[0].batch_size=4",
                             "--set", "stages[0].micro_batch_size=4"], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    [written] = (tmp_path / "ws" / "configs").glob("*/run.yaml")
    assert yaml.safe_load(written.read_text())["stages"][0] | {"epochs": 2, "batch_size": 4} == \
        yaml.safe_load(written.read_text())["stages"][0]
    state = json.loads((tmp_path / "run" / "finetune" / "last" / "trainer_state.json").read_text())
    assert state["trainer"]["epoch"] == 2 and len(state["trainer"]["history"]) == 2, state["trainer"]

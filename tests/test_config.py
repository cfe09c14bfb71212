import re
from pathlib import Path

import pytest

from ituning.config import ConfigError, config_from_dict, config_to_dict, load_config
from pipeline.presets import load_run_config, with_known_datasets

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
PAPER_ROWS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-large-drop18")


def minimal(**stage) -> dict:
    return {"name": "x", "stages": [{"name": "finetune", "dataset": "coco", "epochs": 30, **stage}]}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_every_config_loads_and_opens_with_its_command(path):
    config = load_run_config(path)
    lines = path.read_text().splitlines()
    opening = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert any(line.startswith(f"# ituning train --config configs/{path.name}") for line in opening)
    assert config.name == path.stem
    assert config_from_dict(config_to_dict(config)) == config


def test_presets_cover_the_paper_rows():
    names = {path.stem for path in CONFIGS}
    for dataset in ("coco", "flickr30k"):
        for row in PAPER_ROWS:
            assert {f"{dataset}-{row}", f"{dataset}-{row}-vlp"} <= names
    vlp = load_config(Path(__file__).parents[1] / "configs" / "coco-gpt2-large-drop18-vlp.yaml")
    assert [(s.name, s.dataset, s.epochs) for s in vlp.stages] == [("pretrain", "vg", 10), ("finetune", "coco", 30)]
    assert vlp.model.drop_first == 18 and vlp.model.language_model == "gpt2-large"
    assert all(stage.batch_size == 4096 for stage in vlp.stages)


@pytest.mark.parametrize("data, key", [
    (minimal(epochs=0), "stages[0].epochs"),
    (minimal(epochs="ten"), "stages[0].epochs"),
    (minimal(captions="some"), "stages[0].captions"),
    (minimal(learning_rat=0.1), "stages[0].learning_rat"),
    (minimal(batch_size=100, micro_batch_size=64), "stages[0].batch_size"),
    (minimal(micro_batch_size="largest"), "stages[0].micro_batch_size"),
    (minimal(micro_batch_size=0), "stages[0].micro_batch_size"),
    (minimal(data_on_device="sometimes"), "stages[0].data_on_device"),
    (minimal(compile=1), "stages[0].compile"),
    (minimal(warmup_fraction=1.5), "stages[0].warmup_fraction"),
    (minimal(dataset="imagenet"), "stages[0].dataset"),
    ({**minimal(), "model": {"drop_first": -1}}, "model.drop_first"),
    ({**minimal(), "model": {"languagemodel": "gpt2"}}, "model.languagemodel"),
    ({**minimal(), "extra": 1}, "extra"),
    ({**minimal(), "license": "Apache 2.0"}, "license"),
    ({"name": "x", "stages": []}, "stages"),
    ({"name": "x", "stages": [minimal()["stages"][0]] * 2}, "stages"),
    ({"stages": minimal()["stages"]}, "name"),
    ({"name": "x", "stages": [{"name": "finetune", "dataset": "coco"}]}, "stages[0].epochs"),
])
def test_bad_keys_and_values_are_errors_naming_the_key(data, key):
    with pytest.raises(ConfigError) as error:
        with_known_datasets(config_from_dict(data))
    assert str(error.value).startswith(f"{key}:")


def test_the_license_is_a_hub_licence_id_and_apache_by_default():
    assert config_from_dict(minimal()).license == "apache-2.0"
    assert config_from_dict({**minimal(), "license": "cc-by-4.0"}).license == "cc-by-4.0"


def test_speed_settings_take_auto_or_a_value():
    stage = config_from_dict(minimal(micro_batch_size="auto", data_on_device=True, compile=False)).stages[0]
    assert (stage.micro_batch_size, stage.data_on_device, stage.compile) == ("auto", True, False)
    defaults = config_from_dict(minimal()).stages[0]
    assert (defaults.micro_batch_size, defaults.data_on_device, defaults.compile) == (64, "auto", "auto")
    with pytest.raises(ConfigError, match=r"stages\[0\].compile: must be bool or auto, got 'yes please'"):
        config_from_dict(minimal(compile="yes please"))


@pytest.mark.parametrize("stage, key, message", [
    ({"dataset": "synthetic"}, "dataset", "must be one of coco, flickr30k, flickr8k, vg (a synthetic corpus is "
                                          "catalogued under"),
    ({"dataset": "nocaps"}, "dataset", "nocaps is only evaluated"),
    ({"train_split": "test"}, "train_split", "coco trains on 'train', got 'test'"),
    ({"val_split": "test"}, "val_split", "coco validates on 'val' or null, got 'test'"),
    ({"dataset": "flickr30k", "train_split": "pretrain"}, "train_split", "flickr30k trains on 'train'"),
    ({"dataset": "vg", "train_split": "pretrain"}, "val_split", "vg has no validation split, so it must be null"),
    ({"dataset": "vg"}, "train_split", "vg trains on 'pretrain', got 'train'"),
])
def test_a_stage_names_a_dataset_and_splits_the_pipeline_trains_on(stage, key, message):
    with pytest.raises(ConfigError) as error:
        with_known_datasets(config_from_dict(minimal(**stage)))
    assert str(error.value).startswith(f"stages[0].{key}: ") and message in str(error.value)


def test_the_splits_each_dataset_trains_and_validates_on():
    stages = [minimal(dataset="vg", train_split="pretrain", val_split=None)["stages"][0] | {"name": "pretrain"},
              minimal(dataset="flickr30k", val_split=None)["stages"][0]]
    config = config_from_dict({"name": "x", "stages": stages})
    assert [(s.dataset, s.train_split, s.val_split) for s in config.stages] == [
        ("vg", "pretrain", None), ("flickr30k", "train", None)]
    assert config_from_dict(minimal()).stages[0].val_split == "val"


def test_yaml_floats_without_a_dot_and_file_errors(tmp_path):
    assert config_from_dict(minimal(learning_rate="1e-4")).stages[0].learning_rate == 1e-4
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages:\n  - name: a\n    dataset: coco\n    epochs: 1\n    colour: red\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: stages\[0\].colour: unknown key"):
        load_config(path)


@pytest.mark.parametrize("name", ["../../victim", "..", ".", "", "runs/x", "a\\b", ".hidden", "-rf", "two words",
                                  "x" * 65, "café", "name\n"])
def test_run_and_stage_names_are_single_safe_folder_names(name):
    with pytest.raises(ConfigError, match=r"^name: must be a folder name"):
        config_from_dict({**minimal(), "name": name})
    with pytest.raises(ConfigError, match=r"^stages\[0\]\.name: must be a folder name"):
        config_from_dict({"name": "x", "stages": [{**minimal()["stages"][0], "name": name}]})


def test_folder_names_that_are_fine_and_stage_names_that_differ_only_in_case():
    stages = [minimal()["stages"][0] | {"name": "Stage_1.v2"}, minimal()["stages"][0] | {"name": "x" * 64}]
    config = config_from_dict({"name": "coco-gpt2-large-drop18-vlp", "stages": stages})
    assert [stage.name for stage in config.stages] == ["Stage_1.v2", "x" * 64]
    with pytest.raises(ConfigError, match=r"^stages: stage names must differ \(ignoring case\)"):
        config_from_dict({"name": "x", "stages": [stages[0], stages[0] | {"name": "stage_1.V2"}]})


def test_overrides_change_settings_by_path_and_are_checked():
    from ituning.config import apply_overrides

    data = minimal()
    changed = apply_overrides(data, ["stages[0].epochs=3", "device=cuda", "stages[0].learning_rate=1e-4",
                                     "model.drop_first=2"])
    config = config_from_dict(changed)
    assert (config.stages[0].epochs, config.device, config.stages[0].learning_rate) == (3, "cuda", 1e-4)
    assert config.model.drop_first == 2 and data == minimal()  # the data given is left as it was
    for assignment, message in [("stages[3].epochs=1", "stages has 1 item(s), no [3]"),
                                ("epochs", "expected KEY=VALUE"), ("stages.x[=1", "neither a key nor key[index]")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            apply_overrides(data, [assignment])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.epochs: must be positive"):
        config_from_dict(apply_overrides(data, ["stages[0].epochs=0"]))

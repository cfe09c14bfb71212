import json

import pytest
import torch
from torch.testing import assert_close

from ituning.backbones import BackboneSpec
from ituning.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, IncompatibleCheckpoint, load_weights_into, save_checkpoint,
                                settle_folder, write_folder)
from ituning.model import ITuningCaptioner, ITuningConfig
from tests.conftest import VISUAL_WIDTH, random_visual, tiny_captioner, tiny_language_model
from tests.interruptions import FileSystemSteps, Killed

SPEC = BackboneSpec(vision_model="tiny-vit", vision_pretrained=None, language_model="tiny-gpt2")


def same_backbone_fresh_modules(model, config=ITuningConfig(zero_init_output=False)):
    language_model = tiny_language_model(model.language_model.config.n_layer)
    plain_state = {k.replace(".mlp.mlp.", ".mlp."): v for k, v in model.language_model.state_dict().items()
                   if ".ituning." not in k}
    language_model.load_state_dict(plain_state)
    return ITuningCaptioner(language_model, VISUAL_WIDTH, config).eval()


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = tiny_captioner(ITuningConfig(zero_init_output=False, drop_first=1))
    save_checkpoint(tmp_path, model, SPEC)
    restored = same_backbone_fresh_modules(model, ITuningConfig(zero_init_output=False, drop_first=1))
    tokens, visual = torch.randint(0, 100, (2, 5)), random_visual()
    assert not torch.allclose(restored(tokens, visual=visual).logits, model(tokens, visual=visual).logits)
    load_weights_into(restored, tmp_path, SPEC)
    assert_close(restored(tokens, visual=visual).logits, model(tokens, visual=visual).logits, rtol=0, atol=0)


def test_checkpoint_holds_only_module_weights_and_describes_itself(tmp_path):
    from safetensors.torch import load_file

    model = tiny_captioner(ITuningConfig(drop_first=1, scale=3.0))
    save_checkpoint(tmp_path, model, SPEC)
    weights = load_file(tmp_path / WEIGHTS_FILE)
    assert sum(t.numel() for t in weights.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(key.startswith(("layers.1.", "layers.2.")) for key in weights)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["backbones"] == SPEC.to_dict()
    assert config["ituning"] == {"bottleneck": 16, "scale": 3.0, "scale_attention": True,
                                 "zero_init_output": True, "drop_first": 1}
    assert config["architecture"]["module_layers"] == [1, 2] and config["code_version"]


@pytest.mark.parametrize("change", ["other_lm_name", "other_depth", "other_dropping"])
def test_loading_onto_a_different_backbone_is_refused(tmp_path, change):
    model = tiny_captioner()
    save_checkpoint(tmp_path, model, SPEC)
    target, spec = model, SPEC
    if change == "other_lm_name":
        spec = BackboneSpec(SPEC.vision_model, None, "gpt2-medium")
    elif change == "other_depth":
        target = tiny_captioner(n_layer=2)
    else:
        target = tiny_captioner(ITuningConfig(drop_first=1))
    with pytest.raises(IncompatibleCheckpoint, match="other backbones"):
        load_weights_into(target, tmp_path, spec)


def test_a_folder_without_a_checkpoint_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an I-Tuning checkpoint"):
        load_weights_into(tiny_captioner(), tmp_path, SPEC)


def write_texts(texts: dict[str, str]):
    def write(folder):
        folder.mkdir()
        for name, text in texts.items():
            (folder / name).write_text(text)

    return write


def folder_texts(folder) -> dict[str, str] | None:
    return {path.name: path.read_text() for path in folder.iterdir()} if folder.exists() else None


OLD, NEW = {"weights": "old weights", "metrics": "old metrics"}, {"weights": "new weights", "metrics": "new metrics"}
# (kill at step, halfway) over every step of a folder write: 3 steps when there is no folder yet (two
# files, one rename), 5 when it replaces one (two files, two renames, removing the old folder).
FRESH_POINTS = [(0, False), (0, True), (1, False), (1, True), (2, False)]
REPLACING_POINTS = FRESH_POINTS + [(3, False), (4, False), (4, True)]


@pytest.mark.parametrize("replacing", [False, True], ids=["fresh", "replacing"])
def test_a_folder_write_keeps_a_whole_folder_at_every_step(tmp_path, replacing):
    target = tmp_path / "best"
    if replacing:
        write_folder(target, write_texts(OLD))
    steps = FileSystemSteps(tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        steps.install(patch)
        write_folder(target, write_texts(NEW))
    assert [kind for kind, _ in steps.steps] == (
        ["write", "write", "rename", "rename", "remove"] if replacing else ["write", "write", "rename"])
    assert folder_texts(target) == NEW and sorted(path.name for path in tmp_path.iterdir()) == ["best"]


@pytest.mark.parametrize("replacing, at, halfway",
                         [(False, *point) for point in FRESH_POINTS] + [(True, *point) for point in REPLACING_POINTS])
def test_a_killed_folder_write_settles_to_the_old_or_the_new_folder(tmp_path, replacing, at, halfway):
    target = tmp_path / "best"
    if replacing:
        write_folder(target, write_texts(OLD))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        FileSystemSteps(tmp_path, kill_at=at, halfway=halfway).install(patch)
        write_folder(target, write_texts(NEW))
    for kill_at in range(10):  # settling may be killed too, again and again: each try gets one step further
        with pytest.MonkeyPatch.context() as patch:
            FileSystemSteps(tmp_path, kill_at=kill_at, halfway=True).install(patch)
            try:
                settle_folder(target)
                break
            except Killed:
                continue
    settle_folder(target)
    assert folder_texts(target) in ([OLD, NEW] if replacing else [None, NEW])
    assert sorted(path.name for path in tmp_path.iterdir()) == (["best"] if target.exists() else [])
    write_folder(target, write_texts(NEW))  # and the next write goes through
    assert folder_texts(target) == NEW and sorted(path.name for path in tmp_path.iterdir()) == ["best"]


def test_a_checkpoint_in_a_workspace_names_its_backbones_relative_to_it_and_loads_after_a_move(tmp_path):
    import shutil

    from ituning.checkpoint import backbones_of, read_config

    workspace = tmp_path / "ws"
    for folder in ("backbones/vision", "backbones/language"):
        (workspace / folder).mkdir(parents=True)
    spec = BackboneSpec(f"local-dir:{workspace}/backbones/vision", None, str(workspace / "backbones/language"))
    model = tiny_captioner()
    checkpoint = workspace / "runs" / "demo" / "finetune" / "best"
    save_checkpoint(checkpoint, model, spec, workspace=workspace)
    saved = read_config(checkpoint)
    assert saved["backbones"] == {"vision_model": "local-dir:backbones/vision", "vision_pretrained": None,
                                  "language_model": "backbones/language"}
    assert saved["workspace"] == "../../../.."

    moved = tmp_path / "elsewhere" / "ws"
    shutil.move(workspace, moved)
    moved_spec = BackboneSpec(f"local-dir:{moved}/backbones/vision", None, str(moved / "backbones/language"))
    moved_checkpoint = moved / "runs" / "demo" / "finetune" / "best"
    assert backbones_of(saved, moved_checkpoint) == moved_spec
    restored = same_backbone_fresh_modules(model)
    load_weights_into(restored, moved_checkpoint, moved_spec)  # the same backbones, at their new place
    with pytest.raises(IncompatibleCheckpoint):
        load_weights_into(restored, moved_checkpoint, spec)  # the old place is another backbone

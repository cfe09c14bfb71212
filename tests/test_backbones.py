import json
import re
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from ituning.backbones import (
    BackboneSpec,
    BackboneUnavailable,
    load_language_model,
    load_vision_encoder,
)
from ituning.captioner import trainable_count
from tests.hub_server import hub_environment

PAPER_COUNTS = [("gpt2", 0, 14_178_816), ("gpt2-medium", 0, 44_101_632),
                ("gpt2-large", 0, 94_487_040), ("gpt2-large", 18, 47_243_520)]


@pytest.mark.parametrize("language_model, drop_first, expected", PAPER_COUNTS)
def test_trainable_counts_equal_the_paper(language_model, drop_first, expected):
    assert trainable_count(language_model, "ViT-B-16", drop_first) == expected


UNREACHABLE = """
import json
from ituning.backbones import BackboneSpec, BackboneUnavailable, hub_reachable, load_language_model, load_vision_encoder

report = {"reachable": hub_reachable()}
for name, load in (("lm", lambda: load_language_model("gpt2")),
                   ("vision", lambda: load_vision_encoder(BackboneSpec("ViT-B-16", "openai"))),
                   ("hf-hub", lambda: load_vision_encoder(BackboneSpec("hf-hub:org/clip", None)))):
    try:
        load()
        report[name] = "loaded"
    except BackboneUnavailable as error:
        report[name] = str(error)
print(json.dumps(report))
"""


@pytest.mark.timeout(180)
def test_unreachable_hub_fails_fast_with_one_clear_message(tmp_path):
    """huggingface_hub reads HF_ENDPOINT when imported, so the loaders run in a fresh process."""
    env = hub_environment("http://127.0.0.1:9", tmp_path / "empty-hf-home")  # discard port: nothing listens
    done = subprocess.run([sys.executable, "-c", UNREACHABLE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["reachable"] is False
    assert re.search(r"'gpt2': it is not in the local cache.*--lm /path/to/gpt2", report["lm"])
    assert re.search(r"'ViT-B-16 \(openai\)'.*local-dir:", report["vision"])
    assert re.search(r"'hf-hub:org/clip'.*local-dir:", report["hf-hub"])


def test_missing_local_paths_are_named(tmp_path):
    with pytest.raises(BackboneUnavailable, match="folder not found"):
        load_language_model(str(tmp_path / "nope"))
    with pytest.raises(BackboneUnavailable, match="weights file not found"):
        load_vision_encoder(BackboneSpec("ViT-B-16", str(tmp_path / "w.safetensors")))
    with pytest.raises(BackboneUnavailable, match="no open_clip_config.json"):
        load_vision_encoder(BackboneSpec(f"local-dir:{tmp_path}", None))


@pytest.mark.slow
def test_vit_b_16_yields_197_final_layer_tokens_before_the_projection():
    encoder = load_vision_encoder(BackboneSpec("ViT-B-16", None))
    pixels = torch.randn(2, 3, 224, 224)
    tokens = encoder(pixels)
    assert tokens.shape == (2, 197, 768) and encoder.width == 768
    encoder.visual.output_tokens = True
    _, patches = encoder.visual(pixels)  # open_clip's own patch tokens after ln_post
    assert_close(tokens[:, 1:], patches)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_standins_load_through_the_real_loaders(standin_backbones):
    encoder = load_vision_encoder(standin_backbones)
    language_model, tokenizer = load_language_model(standin_backbones.language_model)
    assert len(tokenizer) == language_model.config.vocab_size > 100  # an empty tokenizer would pass silently
    assert tokenizer.decode(tokenizer("a red circle").input_ids) == "a red circle"
    assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 65, 128)
    assert not any(p.requires_grad for p in language_model.parameters())

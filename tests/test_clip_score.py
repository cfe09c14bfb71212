"""CLIPScore and RefCLIPScore: the formulas on embeddings with hand-computed answers, torchmetrics'
CLIPScore on the same model as a cross-check, the open_clip scorer on the stand-in CLIP, the
evaluation setting of run configs, and the gallery's per-image scores."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from ituning.backbones import LOCAL_DIR, BackboneUnavailable
from ituning.clip_score import (
    CAPTION_PREFIX,
    CLIP_S,
    REF_CLIP_S,
    CaptionScores,
    clip_s,
    clip_score_captions,
    harmonic_mean,
    load_clip_scorer,
    ref_clip_s,
    reference_similarity,
)
from ituning.config import ConfigError, EvaluationSettings, apply_overrides, config_from_dict, config_to_dict
from pipeline import evaluation, presets
from pipeline.gallery import gallery_items, write_gallery
from tests.scene_images import shape_image


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---- the formulas, with answers computed by hand ---------------------------------------------------


def test_clip_s_is_w_times_the_cosine_clipped_at_zero():
    image = rows([1.0, 0.0], [1.0, 0.0], [3.0, 0.0], [1.0, 0.0])
    # orthogonal; 60 degrees (cos 0.5); same direction, other lengths; 135 degrees (cos -0.707)
    text = rows([0.0, 1.0], [0.5, math.sqrt(3) / 2], [2.0, 0.0], [-1.0, 1.0])
    assert_close(clip_s(image, text), rows(0.0, 1.25, 2.5, 0.0))
    assert_close(clip_s(image, text, w=1.0), rows(0.0, 0.5, 1.0, 0.0))


def test_ref_clip_s_is_the_harmonic_mean_of_clip_s_and_the_best_reference():
    image, caption = rows([0.6, 0.8]), rows([1.0, 0.0])  # cos 0.6: CLIP-S = 2.5 * 0.6 = 1.5
    references = [rows([0.0, 1.0], [0.8, 0.6], [-1.0, 0.0])]  # cosines 0, 0.8, -1: the best is 0.8
    assert_close(reference_similarity(caption, references), rows(0.8))
    assert_close(ref_clip_s(image, caption, references), rows(2 * 1.5 * 0.8 / (1.5 + 0.8)))  # 1.0435


def test_ref_clip_s_is_zero_when_either_side_is_and_never_nan():
    image = rows([1.0, 0.0], [1.0, 0.0], [1.0, 0.0])
    caption = rows([0.0, 1.0], [1.0, 0.0], [-1.0, 0.0])  # CLIP-S 0, 2.5, 0
    references = [rows([0.0, 1.0]), rows([-1.0, 0.0]), rows([1.0, 0.0])]  # cosines 1, -1, -1
    assert_close(reference_similarity(caption, references), rows(1.0, 0.0, 0.0))
    assert_close(ref_clip_s(image, caption, references), rows(0.0, 0.0, 0.0))  # the last: 0 and 0, not 0/0
    assert_close(harmonic_mean(rows(0.0, 2.0), rows(0.0, 2.0)), rows(0.0, 2.0))


def test_each_image_has_its_own_number_of_references():
    image = rows([1.0, 0.0], [0.0, 1.0])
    caption = rows([1.0, 0.0], [0.0, 1.0])  # CLIP-S 2.5 each
    references = [rows([0.0, 1.0]), rows([1.0, 0.0], [0.6, 0.8], [0.0, -1.0])]  # best: 0 and 0.8
    assert_close(ref_clip_s(image, caption, references), rows(0.0, 2 * 2.5 * 0.8 / 3.3))


def test_corpus_scores_are_the_means_over_images():
    scores = CaptionScores({"a": 1.0, "b": 0.5}, {"a": 0.4, "b": 0.2})
    assert scores.means() == pytest.approx({CLIP_S: 0.75, REF_CLIP_S: 0.3})
    assert scores.per_image() == {"a": {CLIP_S: 1.0, REF_CLIP_S: 0.4}, "b": {CLIP_S: 0.5, REF_CLIP_S: 0.2}}
    assert CaptionScores({"a": 1.0}, {}).means() == {CLIP_S: 1.0}  # scored without references


# ---- torchmetrics' CLIPScore on the same model ---------------------------------------------------


def save_tiny_hf_clip(folder: Path) -> Path:
    """A random transformers CLIPModel with its processor; the tokenizer knows the letters a-z (each
    also as a word end) and no merges, which is all the captions below need."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {token: index for index, token in
             enumerate([*letters, *(f"{letter}</w>" for letter in letters), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**layers, "vocab_size": len(vocab), "max_position_embeddings": 32,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={**layers, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


class ProjectedFeatures(torch.nn.Module):
    """The CLIPModel with get_*_features giving the projected embedding tensor. transformers 5 returns
    a model output holding it as pooler_output, which torchmetrics 1.9 takes for the tensor
    (Lightning-AI/torchmetrics#3407); its callable model_name_or_path accepts any CLIP-like model."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


@pytest.mark.slow  # importing torchmetrics alone takes seconds
def test_clip_s_matches_torchmetrics_clip_score_on_the_same_embeddings(tmp_path):
    from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_hf_clip(tmp_path / "tiny-clip")
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 40, 48), generator=generator, dtype=torch.uint8) for _ in range(6)]
    captions = ["a red circle", "two blue squares", "a green triangle", "a dog", "grass", "a yellow star"]
    with torch.no_grad():
        image_emb = model.get_image_features(**processor(images=images, return_tensors="pt")).pooler_output
        text_emb = model.get_text_features(**processor(text=captions, return_tensors="pt", padding=True)).pooler_output
        # torchmetrics, one pair at a time: 100 * max(cos, 0) (over a batch it clips the mean instead)
        theirs = torch.stack([torchmetrics_clip_score(image, caption, lambda: (ProjectedFeatures(model), processor))
                              for image, caption in zip(images, captions)])
    assert_close(clip_s(image_emb, text_emb), 2.5 / 100 * theirs, atol=1e-5, rtol=1e-4)
    assert_close(clip_s(image_emb, text_emb, w=100.0), theirs, atol=1e-3, rtol=1e-4)


# ---- the open_clip scorer, on the stand-in CLIP -------------------------------------------------


SHAPES = {"1": ("red", "circle"), "2": ("blue", "square"), "3": ("green", "triangle")}
CANDIDATES = {"1": "a red circle", "2": "a blue square", "3": "a red square"}
REFERENCES = {"1": ["a red circle", "a circle in the middle"], "2": ["a blue square"],
              "3": ["a green triangle", "a triangle", "something green"]}


@pytest.fixture(scope="module")
def scorer(standin_backbones):
    """The random stand-in CLIP with its text projection negated. Untrained, it finds every caption
    disagreeing with every image (cosines about -0.05 to -0.2, all CLIP-S 0); negated, they agree to
    different degrees, so per-image scores differ and none is clipped."""
    scorer = load_clip_scorer(standin_backbones.vision_model, None)
    with torch.no_grad():
        scorer.model.text_projection.neg_()
    return scorer


def test_scorer_prompts_every_text_and_uses_the_clips_own_preprocessing(scorer, standin_backbones):
    from transformers import AutoTokenizer

    from ituning.standins import clip_text_tokens

    images = {key: shape_image(colour, shape) for key, (colour, shape) in SHAPES.items()}
    scores = scorer.score(CANDIDATES, images, REFERENCES)
    keys = sorted(CANDIDATES)
    tokenizer = AutoTokenizer.from_pretrained(standin_backbones.language_model)  # the stand-in CLIP's BPE

    def embed(texts):
        return scorer.model.encode_text(clip_text_tokens([f"{CAPTION_PREFIX} {text}" for text in texts], tokenizer))

    with torch.no_grad():
        image_emb = scorer.model.encode_image(torch.stack([scorer.preprocess(images[key]) for key in keys]))
        text_emb = embed([CANDIDATES[key] for key in keys])
        references = [embed(REFERENCES[key]) for key in keys]
    assert_close(scorer.embed_texts([CANDIDATES[key] for key in keys]), text_emb)
    clip = torch.tensor([scores.clip_s[key] for key in keys])
    assert (clip > 0).all() and len(set(clip.tolist())) == 3  # nothing clipped, every image its own score
    assert_close(clip, clip_s(image_emb, text_emb))
    assert_close(torch.tensor([scores.ref_clip_s[key] for key in keys]), ref_clip_s(image_emb, text_emb, references))
    assert scores.means()[CLIP_S] == pytest.approx(sum(scores.clip_s.values()) / 3)


def test_image_files_score_like_the_images_themselves(scorer, standin_backbones, tmp_path):
    images, files = {}, {}
    for key, (colour, shape) in SHAPES.items():
        images[key] = shape_image(colour, shape)
        files[key] = tmp_path / f"{key}.png"
        images[key].save(files[key])
    from_files, from_images = scorer.score(CANDIDATES, files, REFERENCES), scorer.score(CANDIDATES, images, REFERENCES)
    assert from_files.clip_s == pytest.approx(from_images.clip_s)
    assert from_files.ref_clip_s == pytest.approx(from_images.ref_clip_s)
    untouched = clip_score_captions(CANDIDATES, files, REFERENCES, standin_backbones.vision_model, None)
    assert set(untouched.per_image()) == set(CANDIDATES)  # the stand-in as saved: loaded and scored in one call
    without_references = scorer.score(CANDIDATES, files)
    assert without_references.ref_clip_s == {} and set(without_references.means()) == {CLIP_S}


def test_scorer_names_what_is_missing(scorer, tmp_path):
    image = {"1": shape_image("red", "circle")}
    with pytest.raises(ValueError, match="have no image"):
        scorer.score({"1": "a red circle", "2": "a blue square"}, image)
    with pytest.raises(ValueError, match="have no references"):
        scorer.score({"1": "a red circle"}, image, {"1": []})
    with pytest.raises(ValueError, match="no candidate captions"):
        scorer.score({}, image)
    with pytest.raises(BackboneUnavailable, match="no open_clip_config.json"):
        load_clip_scorer(f"{LOCAL_DIR}{tmp_path}")
    with pytest.raises(BackboneUnavailable, match="weights file not found"):
        load_clip_scorer("ViT-B-32", str(tmp_path / "missing.safetensors"))


# ---- the setting in run configs ----------------------------------------------------------------------


def minimal(**evaluation_settings) -> dict:
    config = {"name": "x", "stages": [{"name": "finetune", "dataset": "coco", "epochs": 1}]}
    return {**config, "evaluation": evaluation_settings} if evaluation_settings else config


def test_clip_score_model_defaults_to_the_papers_vit_b_32_and_can_be_turned_off():
    assert config_from_dict(minimal()).evaluation == EvaluationSettings("ViT-B-32", "openai")  # an older file
    assert presets.resolve_config("coco-gpt2", Path("/nonexistent")).evaluation == EvaluationSettings()
    assert config_from_dict(minimal(clip_score_model=None)).evaluation.clip_score_model is None
    switched = config_from_dict(apply_overrides(minimal(), ["evaluation.clip_score_model=null"]))
    assert switched.evaluation.clip_score_model is None
    with pytest.raises(ConfigError, match=r"^evaluation\.clip_score_model: must name a CLIP model"):
        config_from_dict(minimal(clip_score_model=" "))
    with pytest.raises(ConfigError, match=r"^evaluation\.clip_model: unknown key"):
        config_from_dict(minimal(clip_model="ViT-B-32"))


def test_the_demo_scores_with_its_stand_in_clip_from_the_workspace(tmp_path):
    (tmp_path / "backbones" / "vision").mkdir(parents=True)
    (tmp_path / "backbones" / "language").mkdir()
    demo = presets.resolve_config("demo", tmp_path)
    assert demo.evaluation.clip_score_model == demo.model.vision_model
    assert demo.evaluation.clip_score_model == f"{LOCAL_DIR}{(tmp_path / 'backbones' / 'vision').resolve()}"


def test_a_checkpoint_is_scored_as_its_run_config_says(tmp_path):
    run = tmp_path / "runs" / "x"
    (run / "finetune" / "best").mkdir(parents=True)
    recorded = config_from_dict(minimal(clip_score_model=f"{LOCAL_DIR}/clips/tiny", clip_score_pretrained=None))
    (run / "config.json").write_text(json.dumps(config_to_dict(recorded)))  # as training writes it
    assert evaluation.evaluation_settings(run / "finetune" / "best") == EvaluationSettings(f"{LOCAL_DIR}/clips/tiny",
                                                                                           None)
    (tmp_path / "elsewhere" / "best").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # not a run config
    assert evaluation.evaluation_settings(tmp_path / "elsewhere" / "best") == EvaluationSettings()
    assert evaluation.evaluation_settings(run / "other-stage" / "best") == EvaluationSettings()


def test_command_line_choice_of_clip_model():
    assert evaluation.scoring_from_options(None, "openai") is None  # the run config's
    assert evaluation.scoring_from_options("none", "openai").clip_score_model is None
    assert evaluation.scoring_from_options("ViT-L-14", "openai") == EvaluationSettings("ViT-L-14", "openai")


# ---- the gallery -----------------------------------------------------------------------------------------


def test_gallery_rows_show_each_captions_clip_scores(tmp_path):
    files = {}
    for key, (colour, shape) in SHAPES.items():
        files[key] = tmp_path / f"{key}.png"
        shape_image(colour, shape).save(files[key])
    scores = {"1": {CLIP_S: 0.5, REF_CLIP_S: 0.25}, "2": {CLIP_S: 0.75}}
    items = gallery_items(CANDIDATES, REFERENCES, files, scores=scores)
    page = write_gallery(items, tmp_path / "gallery").read_text()
    rows_of = {key: next(row for row in page.split("<tr>") if f'alt="{key}"' in row) for key in SHAPES}
    assert "CLIP-S 0.500 · RefCLIP-S 0.250" in rows_of["1"]
    assert "CLIP-S 0.750" in rows_of["2"] and "RefCLIP-S" not in rows_of["2"]
    assert 'class="scores"' not in rows_of["3"]  # an image without scores shows none

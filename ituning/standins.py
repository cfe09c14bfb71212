"""Tiny stand-in backbones for machines that cannot download CLIP-ViT or GPT-2.

They are saved in the standard formats -- an open_clip folder (open_clip_config.json +
open_clip_model.safetensors, loaded as `local-dir:`), a transformers GPT-2 folder and a byte-level
BPE tokenizer -- so they load through exactly the loaders used for the real backbones.
"""

import json
from pathlib import Path

import torch

from ituning.backbones import LOCAL_DIR, BackboneSpec
from ituning.compat import ensure_torchvision_importable, quiet_transformers

EOS_TOKEN = "<|endoftext|>"
TINY_VISION = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 512, "width": 128, "heads": 4, "layers": 2},
}
TINY_LANGUAGE = {"n_layer": 3, "n_embd": 128, "n_head": 4, "n_positions": 64}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def train_tokenizer(texts, vocab_size: int = 400):
    """A byte-level BPE tokenizer with GPT-2's single special token as BOS, EOS and padding."""
    ensure_torchvision_importable()
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )


def save_vision_standin(directory: Path, seed: int, model=None) -> str:
    """Write an open_clip folder; with no model, a randomly initialised one. Returns its name."""
    ensure_torchvision_importable()
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    if model is None:
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_VISION)
    config = {
        "model_cfg": TINY_VISION,
        "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic"},
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, directory / "open_clip_model.safetensors")
    return f"{LOCAL_DIR}{directory}"


def new_language_standin(tokenizer, seed: int):
    ensure_torchvision_importable()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **TINY_LANGUAGE)
    return GPT2LMHeadModel(config)


def save_language_standin(directory: Path, tokenizer, model) -> str:
    quiet_transformers()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def build_random_standins(directory: str | Path, texts, seed: int = 0) -> BackboneSpec:
    """Untrained stand-ins: enough to exercise every loader and the decoding path."""
    directory = Path(directory)
    tokenizer = train_tokenizer(texts)
    vision = save_vision_standin(directory / "vision", seed)
    language = save_language_standin(directory / "language", tokenizer, new_language_standin(tokenizer, seed))
    return BackboneSpec(vision_model=vision, vision_pretrained=None, language_model=language)

"""Tiny stand-in backbones for machines that cannot download CLIP-ViT or GPT-2.

They are saved in the standard formats -- an open_clip folder (open_clip_config.json +
open_clip_model.safetensors, loaded as `local-dir:`), a transformers GPT-2 folder and a byte-level
BPE tokenizer -- so they load through exactly the loaders used for the real backbones. Each folder
also holds ituning-standin.json, which marks it a stand-in (ituning/provenance.py): what is trained
on it and scored with it says so.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ituning.backbones import LOCAL_DIR, BackboneSpec
from ituning.compat import quiet_transformers
from ituning.data import caption_token_rows, pad_caption_rows
from ituning.encoding import load_pixels
from ituning.progress import Progress
from ituning.provenance import STANDIN_MARKER
from ituning.schedule import warmup_cosine

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
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    # no progress: a second's work, and off a terminal the trainer's bar leaves only empty lines
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS_TOKEN],
                            show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )


def save_vision_standin(directory: Path, seed: int, model=None) -> str:
    """Write an open_clip folder; with no model, a randomly initialised one. Returns its name."""
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
    mark_standin(directory, "a tiny CLIP (ViT and text tower), not OpenAI's")
    return f"{LOCAL_DIR}{directory}"


def mark_standin(directory: Path, what: str) -> None:
    (directory / STANDIN_MARKER).write_text(json.dumps({"standin": True, "what": what}, indent=1))


def new_language_standin(tokenizer, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **TINY_LANGUAGE)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, after a warning
    return model


def save_language_standin(directory: Path, tokenizer, model) -> str:
    quiet_transformers()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    mark_standin(directory, "a tiny GPT-2 and its tokenizer, not OpenAI's GPT-2")
    return str(directory)


def build_random_standins(directory: str | Path, texts, seed: int = 0) -> BackboneSpec:
    """Untrained stand-ins: enough to exercise every loader and the decoding path."""
    directory = Path(directory)
    tokenizer = train_tokenizer(texts)
    vision = save_vision_standin(directory / "vision", seed)
    language = save_language_standin(directory / "language", tokenizer, new_language_standin(tokenizer, seed))
    return BackboneSpec(vision_model=vision, vision_pretrained=None, language_model=language)


# --- Stand-ins trained on a caption corpus -------------------------------------------------------
# The random stand-ins above exercise the loaders; these learn enough from a Karpathy-format corpus
# (the synthetic one, or a user's own) that I-Tuning on top of them can learn grounding offline.


@dataclass(frozen=True)
class StandinTraining:
    vision_steps: int = 300  # contrastive steps for the ViT (with a tiny text tower)
    language_steps: int = 300  # language-model steps for the GPT-2
    batch_size: int = 128
    learning_rate: float = 1e-3
    vocab_size: int = 400  # byte-level BPE; must stay below the text tower's 512
    seed: int = 0


def vision_preprocess():
    """The stand-in's evaluation transform (the one open_clip builds from its saved config)."""
    import open_clip

    size = TINY_VISION["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic")


def clip_text_tokens(texts: list[str], tokenizer) -> torch.Tensor:
    """Caption ids for the tiny text tower, (B, context). The tower pools at the highest id, so
    every caption ends with the top id of its vocabulary, above all BPE ids."""
    context, end = TINY_VISION["text_cfg"]["context_length"], TINY_VISION["text_cfg"]["vocab_size"] - 1
    tokens = torch.zeros((len(texts), context), dtype=torch.long)
    for row, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        kept = [*ids[: context - 1], end]
        tokens[row, : len(kept)] = torch.tensor(kept)
    return tokens


def _optimizer_and_schedule(parameters, settings: StandinTraining, steps: int, weight_decay: float):
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, steps // 10))


def _optimizer_step(loss: torch.Tensor, optimizer, schedule) -> str:
    """One update from `loss`; the loss as the progress bar shows it."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    return f"{loss.item():.3f}"


def train_vision_standin(pixels: torch.Tensor, captions: list[list[str]], tokenizer,
                         settings: StandinTraining = StandinTraining(), progress: bool = True):
    """A tiny open_clip CLIP trained with the CLIP loss on (image, one of its captions) pairs."""
    import open_clip

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = open_clip.CLIP(**TINY_VISION).train()
    optimizer, schedule = _optimizer_and_schedule(model.parameters(), settings, settings.vision_steps, 0.1)
    clip_loss = open_clip.ClipLoss()
    with Progress(settings.vision_steps, "vision stand-in", "steps", enabled=progress) as shown:
        for _ in range(settings.vision_steps):
            batch = torch.randperm(len(captions), generator=generator)[: settings.batch_size].tolist()
            picks = torch.randint(0, 1 << 30, (len(batch),), generator=generator).tolist()
            text = clip_text_tokens([captions[i][p % len(captions[i])] for i, p in zip(batch, picks)], tokenizer)
            image_features = model.encode_image(pixels[batch], normalize=True)
            text_features = model.encode_text(text, normalize=True)
            loss = clip_loss(image_features, text_features, model.logit_scale.exp())
            shown.update(loss=_optimizer_step(loss, optimizer, schedule))
    return model.eval()


def train_language_standin(texts: list[str], tokenizer, settings: StandinTraining = StandinTraining(),
                           progress: bool = True):
    """A tiny GPT-2 trained as a language model on captions (BOS caption EOS)."""
    model = new_language_standin(tokenizer, settings.seed).train()
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer, schedule = _optimizer_and_schedule(model.parameters(), settings, settings.language_steps, 0.01)
    max_tokens = TINY_LANGUAGE["n_positions"] - 1
    with Progress(settings.language_steps, "language stand-in", "steps", enabled=progress) as shown:
        for _ in range(settings.language_steps):
            batch = torch.randint(0, len(texts), (settings.batch_size,), generator=generator).tolist()
            rows = caption_token_rows([texts[i] for i in batch], tokenizer, max_tokens)
            input_ids, labels, attention_mask = pad_caption_rows(rows, tokenizer.eos_token_id)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            shown.update(loss=_optimizer_step(loss, optimizer, schedule))
    return model.eval()


def build_standins_from_images(images: list[tuple[Path, list[str]]], directory: str | Path,
                               settings: StandinTraining = StandinTraining(), progress: bool = True) -> BackboneSpec:
    """Tokenizer, ViT and GPT-2 stand-ins learned from (image file, its captions) pairs, saved under
    directory/vision (open_clip folder) and directory/language (transformers folder)."""
    directory = Path(directory)
    captions = [texts for _, texts in images]
    texts = [caption for image_captions in captions for caption in image_captions]
    tokenizer = train_tokenizer(texts, settings.vocab_size)
    pixels = load_pixels([path for path, _ in images], vision_preprocess())
    clip = train_vision_standin(pixels, captions, tokenizer, settings, progress)
    vision = save_vision_standin(directory / "vision", settings.seed, clip)
    language_model = train_language_standin(texts, tokenizer, settings, progress)
    language = save_language_standin(directory / "language", tokenizer, language_model)
    return BackboneSpec(vision_model=vision, vision_pretrained=None, language_model=language)

"""What the fast paths' first-use checks cost (ituning/fast_paths.py), on the CPU, next to one batch
of the plain path. Figures go to docs/benchmarks.md.

    .venv/bin/python benchmarks/fast_path_checks.py [--images 64 --batch 8 --rounds 3]

Each check runs once per path per process: one batch through the fast path and one through the
plain path, then a comparison. Here the fast paths that need CUDA are stood in for by their plain
twins (the eager loss for the compiled one, the uncompiled static cache for the compiled decoding,
the CPU decode for nvJPEG), so the figures are the check's own cost: the extra plain batch and the
comparison. Models are the random stand-ins (3 layers, width 128), the images rendered JPEGs.
"""

import argparse
import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ituning  # noqa: F401  (torchvision importable before transformers)
from common import machine, median_seconds
from ituning.config import config_from_dict
from ituning.decoding import CachedStep, DecodingConfig, caption_prompt, ranked_beams, search_difference
from ituning.device_data import batch_difference
from ituning.fast_paths import DATA_ON_DEVICE, forget_outcomes
from ituning.standins import build_random_standins
from ituning.static_decoding import StaticCacheStep
from ituning.training import StageData, StageTrainer, build_model, caption_loss_sum

WORDS = "a red blue green dog cat boat tree sky water field bird man woman car street".split()


def stage_trainer(spec, folder: Path, images: int, batch: int) -> StageTrainer:
    generator = np.random.default_rng(0)
    captions = {f"i{k}": [" ".join(generator.choice(WORDS, 9)) for _ in range(5)] for k in range(images)}
    tokens = {image_id: generator.standard_normal((17, 128)).astype(np.float16) for image_id in captions}
    config = config_from_dict({
        "name": "bench", "device": "cpu",
        "model": {"vision_model": spec.vision_model, "vision_pretrained": None, "language_model": spec.language_model},
        "stages": [{"name": "s", "dataset": "coco", "epochs": 1, "batch_size": batch, "micro_batch_size": batch,
                    "precision": "float32", "data_on_device": True, "val_split": None}]})
    model, tokenizer, backbones = build_model(config, "cpu")
    return StageTrainer(model, tokenizer, backbones, config.stages[0], StageData(tokens, captions), folder,
                        progress=False)


def training_checks(trainer: StageTrainer, rounds: int) -> dict:
    samples = [(image_id, 0) for image_id in list(trainer.data.captions)[: trainer.stage.batch_size]]
    batch = trainer.host_collate(samples)
    plain_batch = median_seconds(lambda: trainer.backward(batch, batch.target_tokens, 1), rounds)
    trainer.optimizer.zero_grad(set_to_none=True)

    def compile_check():
        forget_outcomes()
        trainer.loss_sum = functools.partial(caption_loss_sum)  # the eager loss standing for the compiled one
        trainer.check_compiled_loss(batch)

    held = trainer.device_data
    data_check = lambda: DATA_ON_DEVICE.first_use(  # noqa: E731
        True, lambda: (held, held.collate(samples)), lambda: (None, trainer.host_collate(samples)), batch_difference)
    return {"plain micro-batch (forward + backward) s": plain_batch,
            "compile check s": median_seconds(compile_check, rounds),
            "data_on_device check s": median_seconds(data_check, rounds),
            "micro_batch check (one pass of the chosen size) s": median_seconds(
                lambda: trainer.probe(trainer.stage.batch_size), rounds)}


def decoding_check(trainer: StageTrainer, images: int, rounds: int) -> dict:
    model, tokenizer = trainer.model, trainer.tokenizer
    visual = torch.randn(images, 17, 128)
    prompt = torch.tensor([caption_prompt(tokenizer)])
    config = DecodingConfig(num_beams=5, max_length=12)
    static = functools.partial(StaticCacheStep, max_new_tokens=config.max_length, compile="never")
    fast = lambda: ranked_beams(model, visual, prompt, tokenizer.eos_token_id, config, step=static)  # noqa: E731
    plain = lambda: ranked_beams(model, visual, prompt, tokenizer.eos_token_id, config, step=CachedStep)  # noqa: E731
    batch = median_seconds(fast, rounds)
    check = median_seconds(lambda: search_difference(fast(), plain()), rounds)
    return {"static_decoding: one batch (beam 5) s": batch, "static_decoding check s": check}


def jpeg_check(spec, folder: Path, images: int, rounds: int) -> dict:
    from ituning.backbones import load_vision_encoder
    from ituning.device_jpeg import pixel_difference
    from ituning.encoding import ImageFiles, image_size, split_preprocess

    generator = np.random.default_rng(1)
    items = []
    for index in range(images):
        path = folder / f"{index}.jpg"
        Image.fromarray(generator.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        items.append((0, str(index), str(path)))
    encoder = load_vision_encoder(spec, "cpu")
    transform, blank, _ = split_preprocess(encoder.preprocess, image_size(encoder))
    files = ImageFiles(items, transform, blank, min(image_size(encoder)))
    decode = lambda: torch.stack([files[index][0] for index in range(images)])  # noqa: E731
    return {f"device_decoding check: {images} 640x480 JPEGs decoded on the CPU + compared s":
            median_seconds(lambda: pixel_difference(decode(), decode()), rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        spec = build_random_standins(Path(folder) / "backbones", WORDS * 20)
        trainer = stage_trainer(spec, Path(folder) / "run", args.images, args.batch)
        figures = {**training_checks(trainer, args.rounds), **decoding_check(trainer, args.batch, args.rounds),
                   **jpeg_check(spec, Path(folder), args.batch, args.rounds)}
    print(json.dumps({"machine": machine(), "batch": args.batch,
                      **{name: round(value, 4) for name, value in figures.items()}}, indent=1))


if __name__ == "__main__":
    main()

"""One COCO-sized training epoch at gpt2 size from cached features, through the real trainer.

    python benchmarks/training_epoch.py --device cuda --micro-batch 256     # the whole epoch
    python benchmarks/training_epoch.py --device cuda --images 4096         # 5 steps' worth
    .venv/bin/python benchmarks/training_epoch.py --images 300 --batch 128 --micro-batch 32   # CPU smoke run

The data have COCO's Karpathy-train shape: 113,287 images with 5 captions each (566,435 captions,
every one visited once: `captions: all`), the paper's effective batch of 4096 by accumulation of
micro-batches, bf16 autocast on CUDA. Captions are synthetic scene descriptions, tokenized by a
byte-level BPE trained on them; GPT-2 has random weights and GPT-2's real size (124M parameters,
vocabulary 50,257). Visual tokens (197 x 768 float16 per image, ViT-B-16's shape) are read row
by row from an HDF5 file with one image per chunk, as the feature cache stores them; the file
holds --distinct-features different rows, and image i reads row i modulo that number, so the file
stays small while every read still goes through HDF5.

Besides the epoch (StageTrainer.run: micro-batches collated ahead by --data-workers processes,
forward/backward per micro-batch, clipping, AdamW, the epoch-end checkpoint), the first step's
micro-batches are timed in two halves to find the bottleneck: `collate` alone in one process
(tokenize, read features, stack) and `compute` alone (micro-batches already on the device:
forward, backward, optimizer step).
"""

import argparse
import json
import random
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np
import torch

import ituning  # noqa: F401  (torchvision importable before transformers)
from common import CLIP_TOKENS, CLIP_WIDTH, gpt2_captioner, machine, seconds_on
from ituning.backbones import BackboneSpec
from ituning.config import StageConfig
from ituning.data import collate, epoch_samples
from ituning.standins import train_tokenizer
from ituning.precision import autocast
from ituning.training import StageData, StageTrainer, caption_loss_sum
from storage.scenes import describe, random_scene

COCO_TRAIN_IMAGES = 113_287


class PooledFeatures(Mapping):
    """image id -> (197, 768) float16 row of an HDF5 file, image i reading row i % rows. Like the
    feature cache's reader, each process opens the file on first use (it travels to workers)."""

    def __init__(self, path: Path, image_ids: list[str], rows: int):
        self.path, self.tokens = path, None
        self.row = {image_id: index % rows for index, image_id in enumerate(image_ids)}

    def __getitem__(self, image_id: str) -> np.ndarray:
        if self.tokens is None:
            self.tokens = h5py.File(self.path, "r")["tokens"]
        return self.tokens[self.row[image_id]]

    def __iter__(self):
        return iter(self.row)

    def __len__(self) -> int:
        return len(self.row)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "tokens": None}


def write_features(path: Path, rows: int) -> None:
    generator = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        tokens = handle.create_dataset("tokens", shape=(rows, CLIP_TOKENS, CLIP_WIDTH),
                                       chunks=(1, CLIP_TOKENS, CLIP_WIDTH), dtype=np.float16)
        for first in range(0, rows, 256):
            count = min(256, rows - first)
            tokens[first : first + count] = generator.standard_normal((count, CLIP_TOKENS, CLIP_WIDTH))


def coco_shaped_captions(images: int, per_image: int) -> dict[str, list[str]]:
    rng = random.Random(0)
    return {f"{index:012d}": describe(random_scene(rng), rng, per_image) for index in range(images)}


def halves(trainer: StageTrainer, samples, stage: StageConfig, device: torch.device) -> dict:
    """Collate alone, then forward/backward/AdamW alone on the same micro-batches held on the device."""
    micro = stage.micro_batch_size
    chunks = [samples[i : i + micro] for i in range(0, len(samples), micro)]
    data, tokenizer, batches = trainer.data, trainer.tokenizer, []

    def collate_all():
        batches.extend(collate(chunk, data.captions, data.features, tokenizer, stage.max_caption_tokens)
                       for chunk in chunks)

    collate_s = seconds_on(device, collate_all)
    on_device = [batch.to(device) for batch in batches]
    tokens = sum(batch.target_tokens for batch in batches)

    def compute():
        for batch in on_device:
            with autocast(device, stage.precision):
                (caption_loss_sum(trainer.model, batch) / tokens).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    compute()  # warm-up
    compute_s = seconds_on(device, compute)
    return {"collate_captions_per_s": round(len(samples) / collate_s, 1),
            "compute_captions_per_s": round(len(samples) / compute_s, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4096, help="effective batch (accumulated)")
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--data-workers", type=int, help="collating processes (default: the trainer's)")
    parser.add_argument("--distinct-features", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    captions = coco_shaped_captions(args.images, args.captions_per_image)
    tokenizer = train_tokenizer([text for texts in list(captions.values())[:20_000] for text in texts], 2000)
    stage = StageConfig(name="finetune", dataset="coco", epochs=1, val_split=None, batch_size=args.batch,
                        micro_batch_size=args.micro_batch, data_workers=args.data_workers)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        rows = min(args.distinct_features, args.images)
        write_features(scratch / "features.h5", rows)
        data = StageData(PooledFeatures(scratch / "features.h5", list(captions), rows), captions)
        model = gpt2_captioner("gpt2").to(device)
        trainer = StageTrainer(model, tokenizer, BackboneSpec("ViT-B-16", None, "gpt2"), stage, data,
                               scratch / "run", progress=True)
        setup_s = time.perf_counter() - started
        samples = epoch_samples(captions, stage.captions, stage.seed, 0)
        split = halves(trainer, samples[: args.batch], stage, device)
        trainer = StageTrainer(gpt2_captioner("gpt2").to(device), tokenizer, BackboneSpec("ViT-B-16", None, "gpt2"),
                               stage, data, scratch / "run", progress=True)
        seconds = seconds_on(device, lambda: trainer.run(resume=False))
    rate = len(samples) / seconds
    result = {
        "machine": machine(), "images": args.images, "captions_per_epoch": len(samples),
        "batch": args.batch, "micro_batch": args.micro_batch, "precision": stage.precision,
        "data_workers": args.data_workers, "steps": trainer.steps_per_epoch, "setup_s": round(setup_s, 1),
        "epoch_s": round(seconds, 1), "captions_per_s": round(rate, 1),
        "coco_epoch_minutes_at_this_rate": round(566_435 / rate / 60, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        **split,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

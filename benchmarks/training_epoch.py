"""One COCO-sized training epoch at gpt2 size from cached features, through the real trainer.

    python benchmarks/training_epoch.py --device cuda --micro-batch 256     # the whole epoch
    python benchmarks/training_epoch.py --device cuda --micro-batch auto --data-on-device auto --compile auto
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

Besides the epoch (StageTrainer.run: micro-batches collated ahead by --data-workers processes, or
gathered on the device when the data are held there; forward/backward per micro-batch, clipping,
AdamW, the epoch-end checkpoint), the first step's micro-batches are timed in two halves to find
the bottleneck: `collate` alone (tokenize, read features, stack; or the device's gathers) and
`compute` alone (micro-batches already on the device: forward, backward, optimizer step). Loading
the data onto the device happens once per run and is reported apart (`device_load_s`);
`bf16_peak_share` is the rate times ~14 GFLOP per caption (forward, and backward through the frozen
model for the activations' gradients) over an H200's dense bf16 peak.
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
from ituning.data import epoch_samples
from ituning.fast_paths import outcomes
from ituning.standins import train_tokenizer
from ituning.precision import autocast
from ituning.training import StageData, StageTrainer
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

    def shard_blocks(self):
        """Every image's tokens in blocks, as a feature cache's reader gives them for loading at once."""
        pool = h5py.File(self.path, "r")["tokens"][:]
        image_ids = list(self.row)
        for first in range(0, len(image_ids), 8192):
            block = image_ids[first : first + 8192]
            yield block, pool[[self.row[image_id] for image_id in block]]


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
    """Collate alone (in this process, or gathered on the device), then forward/backward/AdamW alone
    on the same micro-batches held on the device."""
    batches = []
    collate_s = seconds_on(device, lambda: batches.extend(trainer.micro_batches(samples)))
    on_device = [batch.to(device) for batch in batches]
    tokens = sum(batch.target_tokens for batch in batches)

    def compute():
        for batch in on_device:
            with autocast(device, stage.precision):
                (trainer.loss_sum(trainer.model, batch) / tokens).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    compute()  # warm-up
    compute_s = seconds_on(device, compute)
    return {"collate_captions_per_s": round(len(samples) / collate_s, 1),
            "compute_captions_per_s": round(len(samples) / compute_s, 1)}


def micro_batch_setting(text: str) -> int | str:
    return text if text == "auto" else int(text)


def switch(text: str) -> bool | str:
    return {"true": True, "false": False, "auto": "auto"}[text]


H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA's H200 SXM datasheet: dense bf16 tensor-core peak
TRAINING_FLOPS_PER_CAPTION = 14e9  # gpt2 + modules, a COCO caption of ~14 tokens over 197 visual tokens


def peak_share(captions_per_s: float, device: torch.device) -> float | None:
    """The share of an H200's dense bf16 peak at this rate, from the cost model's ~14 GFLOP per caption."""
    if device.type != "cuda" or "H200" not in torch.cuda.get_device_name(device):
        return None
    return round(captions_per_s * TRAINING_FLOPS_PER_CAPTION / H200_BF16_DENSE_FLOPS, 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4096, help="effective batch (accumulated)")
    parser.add_argument("--micro-batch", type=micro_batch_setting, default=64, help="a number or auto")
    parser.add_argument("--data-on-device", type=switch, default="auto", help="true, false or auto")
    parser.add_argument("--compile", type=switch, default="auto", help="true, false or auto")
    parser.add_argument("--data-workers", type=int, help="collating processes (default: the trainer's)")
    parser.add_argument("--distinct-features", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    captions = coco_shaped_captions(args.images, args.captions_per_image)
    tokenizer = train_tokenizer([text for texts in list(captions.values())[:20_000] for text in texts], 2000)
    stage = StageConfig(name="finetune", dataset="coco", epochs=1, val_split=None, batch_size=args.batch,
                        micro_batch_size=args.micro_batch, data_workers=args.data_workers,
                        data_on_device=args.data_on_device, compile=args.compile)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        rows = min(args.distinct_features, args.images)
        write_features(scratch / "features.h5", rows)
        data = StageData(PooledFeatures(scratch / "features.h5", list(captions), rows), captions)
        model = gpt2_captioner("gpt2").to(device)
        trainer = StageTrainer(model, tokenizer, BackboneSpec("ViT-B-16", None, "gpt2"), stage, data,
                               scratch / "run", progress=True)
        setup_s = time.perf_counter() - started
        load_s = seconds_on(device, lambda: trainer.device_data)
        plan = trainer.plan()  # the micro-batch `auto` measures, with the data already on the device
        samples = epoch_samples(captions, stage.captions, stage.seed, 0)
        split = halves(trainer, samples[: args.batch], stage, device)
        epoch_trainer = StageTrainer(gpt2_captioner("gpt2").to(device), tokenizer,
                                     BackboneSpec("ViT-B-16", None, "gpt2"), stage, data, scratch / "run", progress=True)
        epoch_trainer.device_data, epoch_trainer.micro_batch_size = trainer.device_data, trainer.micro_batch_size
        del trainer
        seconds = seconds_on(device, lambda: epoch_trainer.run(resume=False))
    rate = len(samples) / seconds
    result = {
        "machine": machine(), "images": args.images, "captions_per_epoch": len(samples),
        "batch": args.batch, "micro_batch": args.micro_batch, "precision": stage.precision,
        "data_workers": args.data_workers, "plan": plan, "steps": epoch_trainer.steps_per_epoch,
        "setup_s": round(setup_s, 1), "device_load_s": round(load_s, 1),
        "epoch_s": round(seconds, 1), "captions_per_s": round(rate, 1),
        "bf16_peak_share": peak_share(rate, device),
        "coco_epoch_minutes_at_this_rate": round(566_435 / rate / 60, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "fast_paths": outcomes(),  # each checked path: "on", or why it fell back (ituning/fast_paths.py)
        **split,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

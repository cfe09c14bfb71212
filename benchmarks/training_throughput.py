"""Training-step benchmarks (random weights, nothing downloaded). Figures go to docs/benchmarks.md.

    .venv/bin/python benchmarks/training_throughput.py                 # all three
    .venv/bin/python benchmarks/training_throughput.py throughput      # gpt2: cached features vs CLIP in the loop
    .venv/bin/python benchmarks/training_throughput.py dropping        # gpt2-large: drop 18 layers vs none
    .venv/bin/python benchmarks/training_throughput.py sharing [--micro-batch 32 --rounds 3 --threads 1]

`dropping` runs each variant in its own process so that the peak resident memory (ru_maxrss)
belongs to that variant alone. `sharing` trains gpt2 on the same micro-batches of COCO-shaped data
(5 captions per image, in an epoch's order) three ways, interleaved round by round so that other
load on the machine falls on all three alike: I-Tuning with each image's visual keys/values computed
once per micro-batch, I-Tuning computing them per caption (the path before sharing), and full
fine-tuning of the same model (sharing on). Its last line prints both ratios of captions/s.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import ituning  # noqa: F401  (torchvision importable before transformers)
from common import CLIP_TOKENS, CLIP_WIDTH, gpt2_captioner, machine
from ituning.model import ITuningCaptioner, ITuningConfig, trainable_parameters

CAPTION_TOKENS = 20
CAPTIONS_PER_IMAGE = 5  # COCO's
SHARING_MODES = {  # name: (fine-tune every parameter, share visual keys/values)
    "I-Tuning, shared keys/values": (False, True),
    "I-Tuning, keys/values per caption": (False, False),
    "full fine-tuning, shared keys/values": (True, True),
}


def language_model(n_embd=768, n_layer=12, n_head=12):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)).eval()
    return model.requires_grad_(False)


def step_seconds(model, optimizer, visual_source, batch: int, steps: int) -> float:
    """Median seconds of one training step (visual tokens, forward, backward, AdamW)."""
    timings = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        started = time.perf_counter()
        visual = visual_source(batch)
        tokens = torch.randint(0, 50257, (batch, CAPTION_TOKENS))
        model(tokens, visual=visual, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - started)
    return sorted(timings[1:])[len(timings[1:]) // 2]


def throughput(batch: int = 8, steps: int = 5) -> dict:
    import open_clip

    from ituning.backbones import BackboneSpec, VisionEncoder

    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    encoder = VisionEncoder(clip, None, BackboneSpec("ViT-B-16", None))
    model = ITuningCaptioner(language_model(), encoder.width, ITuningConfig())
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    cached = torch.randn(256, 197, encoder.width).half()  # stands in for rows read from the cache

    def from_cache(size):
        return cached[torch.randint(0, len(cached), (size,))].float()

    def from_pixels(size):
        with torch.no_grad():
            return encoder(torch.randn(size, 3, 224, 224))

    results = {}
    for name, source in (("cached features", from_cache), ("CLIP in the loop", from_pixels)):
        seconds = step_seconds(model, optimizer, source, batch, steps)
        results[name] = {"step_s": round(seconds, 3), "captions_per_s": round(batch / seconds, 2)}
    return {"batch": batch, "caption_tokens": CAPTION_TOKENS, "results": results}


def dropping_variant(drop_first: int, batch: int, steps: int) -> dict:
    model = ITuningCaptioner(language_model(1280, 36, 20), 768, ITuningConfig(drop_first=drop_first))
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    visual = torch.randn(batch, 197, 768)
    seconds = step_seconds(model, optimizer, lambda size: visual, batch, steps)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"drop_first": drop_first, "trainable": sum(p.numel() for p in trainable_parameters(model)),
            "step_s": round(seconds, 3), "peak_rss_gib": round(peak_gib, 2)}


def dropping(batch: int = 4, steps: int = 3) -> dict:
    rows = []
    for drop_first in (0, 18):
        command = [sys.executable, __file__, "dropping-variant", str(drop_first), str(batch), str(steps)]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    return {"batch": batch, "caption_tokens": CAPTION_TOKENS, "results": rows}


def coco_shaped_data(images: int) -> tuple[dict, dict]:
    """Scene captions, 5 per image, and random float16 visual tokens of ViT-B-16's shape, by image id."""
    from storage.scenes import describe, random_scene

    rng, generator = random.Random(0), np.random.default_rng(0)
    captions = {f"{index:012d}": describe(random_scene(rng), rng, CAPTIONS_PER_IMAGE) for index in range(images)}
    features = {image_id: generator.standard_normal((CLIP_TOKENS, CLIP_WIDTH)).astype(np.float16)
                for image_id in captions}
    return captions, features


def sharing(micro_batch: int = 32, rounds: int = 3) -> dict:
    """Captions/s of whole training steps (collate, forward, backward, AdamW) on the same micro-batches."""
    from ituning.data import collate, epoch_samples
    from ituning.standins import train_tokenizer
    from ituning.training import caption_loss_sum

    load_before = [round(value, 2) for value in os.getloadavg()]
    captions, features = coco_shaped_data(-(-(rounds + 1) * micro_batch // CAPTIONS_PER_IMAGE))
    tokenizer = train_tokenizer([text for texts in captions.values() for text in texts], 2000)
    samples = epoch_samples(captions, "all", seed=0, epoch=0)
    chunks = [samples[k * micro_batch : (k + 1) * micro_batch] for k in range(rounds + 1)]
    models = {full: gpt2_captioner().eval().requires_grad_(True) if full else gpt2_captioner().eval()
              for full in (False, True)}
    optimizers = {full: torch.optim.AdamW(trainable_parameters(model), lr=1e-5) for full, model in models.items()}

    def step(mode: str, chunk) -> float:
        full, share = SHARING_MODES[mode]
        started = time.perf_counter()
        batch = collate(chunk, captions, features, tokenizer, 40, share_visual=share)
        (caption_loss_sum(models[full], batch) / batch.target_tokens).backward()
        optimizers[full].step()
        optimizers[full].zero_grad(set_to_none=True)
        return time.perf_counter() - started

    seconds = {mode: [] for mode in SHARING_MODES}
    for chunk in chunks:  # the first round warms up and is not counted
        for mode in SHARING_MODES:
            seconds[mode].append(step(mode, chunk))
    timed = sum(len(chunk) for chunk in chunks[1:])
    results = {mode: {"median_step_s": round(statistics.median(times[1:]), 3),
                      "captions_per_s": round(timed / sum(times[1:]), 2)} for mode, times in seconds.items()}
    images = [len({image_id for image_id, _ in chunk}) for chunk in chunks[1:]]
    return {"machine": machine(), "micro_batch": micro_batch, "timed_rounds": rounds,
            "images_per_micro_batch": images, "load_average_before": load_before,
            "load_average_after": [round(value, 2) for value in os.getloadavg()], "results": results}


def sharing_ratios(result: dict) -> str:
    rate = {mode: values["captions_per_s"] for mode, values in result["results"].items()}
    shared, per_caption, full = (rate[mode] for mode in SHARING_MODES)
    return (f"captions/s: shared vs per-caption visual keys/values {shared / per_caption:.2f}x; "
            f"I-Tuning vs full fine-tuning {shared / full:.2f}x (goal >= 2x)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("which", nargs="*", default=["throughput", "dropping", "sharing"])
    parser.add_argument("--micro-batch", type=int, default=32, help="sharing: captions per step")
    parser.add_argument("--rounds", type=int, default=3, help="sharing: timed steps of each way")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.which[0] == "dropping-variant":
        print(json.dumps(dropping_variant(*map(int, args.which[1:]))))
        return
    runs = {"throughput": throughput, "dropping": dropping,
            "sharing": lambda: sharing(args.micro_batch, args.rounds)}
    for which in sorted(args.which, key=lambda name: name == "sharing"):  # its ratios on the last line
        result = runs[which]()
        print(which, json.dumps(result, indent=1))
    if "sharing" in args.which:
        print(sharing_ratios(result))


if __name__ == "__main__":
    main()

"""Feature cache throughput: the whole pipeline against the bare encoder and a one-image-per-forward loop.

    .venv/bin/python benchmarks/feature_cache.py --images 240 --batch-size 32 --rounds 3

On the same rendered JPEGs and the same encoder (ViT-B-16, random weights, 224 px), in one run,
interleaved in rounds (each round takes every rounds-th image and runs all three in turn) so that
other load on the machine falls on all three alike:
  encoder     the forward pass alone on tensors decoded and preprocessed beforehand (the ceiling)
  pipeline    storage.features.extract_features: decoding in DataLoader workers, batched forward,
              float16 HDF5 shards written by the writer thread
  per-image   ClipCap-style: decode and preprocess in the main process, one image per forward,
              tokens collected in memory
Figures go to docs/benchmarks.md.
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

import ituning  # noqa: F401  (makes torchvision importable before open_clip is)
from ituning.backbones import BackboneSpec, load_vision_encoder
from ituning.images import open_rgb
from storage.feature_shards import EncodeSettings
from storage.features import FeatureSettings, extract_features
from storage.scenes import random_scene, render_scene


def render_images(folder: Path, count: int, size: int) -> list[tuple[str, Path]]:
    rng, images = random.Random(0), []
    for index in range(count):
        path = folder / f"{index:06d}.jpg"
        render_scene(random_scene(rng), size=size).save(path, quality=90)
        images.append((f"{index:06d}", path))
    return images


def bare_encoder(encoder, images, batch_size: int) -> float:
    pixels = torch.stack([encoder.preprocess(open_rgb(path)) for _, path in images])  # (N, 3, 224, 224)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(pixels), batch_size):
            encoder(pixels[first : first + batch_size]).half()
    return len(images) / (time.perf_counter() - start)


def pipeline(encoder, spec, images, out_dir: Path, batch_size: int, workers: int) -> float:
    settings = FeatureSettings(shard_size=128, encode=EncodeSettings(batch_size, workers, "cpu"))
    start = time.perf_counter()
    report = extract_features(images, spec, out_dir, settings, encoder=encoder)
    elapsed = time.perf_counter() - start
    assert report.entry is not None and not report.unreadable and report.encoded_shards
    return len(images) / elapsed


def one_image_per_forward(encoder, images) -> float:
    start, kept = time.perf_counter(), []
    with torch.inference_mode():
        for _, path in images:
            pixels = encoder.preprocess(open_rgb(path)).unsqueeze(0)  # (1, 3, 224, 224)
            kept.append(encoder(pixels).half().numpy())
    return len(images) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--image-size", type=int, default=480, help="side of the rendered JPEGs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec = BackboneSpec(args.model, None)
    encoder = load_vision_encoder(spec)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "images").mkdir()
        images = render_images(scratch / "images", args.images, args.image_size)
        with torch.inference_mode():
            encoder(torch.zeros(2, 3, 224, 224))  # warm-up
        seconds, load_before = {"encoder": 0.0, "pipeline": 0.0, "per-image": 0.0}, os.getloadavg()[0]
        for round_ in range(args.rounds):
            subset = images[round_ :: args.rounds]
            seconds["encoder"] += len(subset) / bare_encoder(encoder, subset, args.batch_size)
            seconds["pipeline"] += len(subset) / pipeline(encoder, spec, subset, scratch / f"cache-{round_}",
                                                          args.batch_size, args.workers)
            seconds["per-image"] += len(subset) / one_image_per_forward(encoder, subset)
    rates = {name: len(images) / spent for name, spent in seconds.items()}
    result = {
        "model": args.model, "images": args.images, "rounds": args.rounds, "batch_size": args.batch_size,
        "workers": args.workers, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "images_per_s": {name: round(rate, 2) for name, rate in rates.items()},
        "pipeline_over_encoder": round(rates["pipeline"] / rates["encoder"], 3),
        "pipeline_over_per_image": round(rates["pipeline"] / rates["per-image"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Feature cache throughput: the whole pipeline against the bare encoder and a one-image-per-forward loop.

    .venv/bin/python benchmarks/feature_cache.py --images 240 --batch-size 32 --rounds 3
    python benchmarks/feature_cache.py --device cuda --images 20000 --image-size 640x480 --textured \
        --batch-size 256 --workers 15 --rounds 1 --sample 2000 --decode-on-device never   # then auto

On the same rendered JPEGs and the same encoder (ViT-B-16, random weights, 224 px), in one run,
interleaved in rounds (each round takes every rounds-th image and runs all three in turn) so that
other load on the machine falls on all three alike:
  encoder     the forward pass alone on tensors decoded and preprocessed beforehand (the ceiling)
  pipeline    pipeline.features.encode_features: decoding in DataLoader workers (JPEGs on the
              device, see --decode-on-device), batched forward, float16 HDF5 shards written by
              the writer thread
  per-image   ClipCap-style: decode and preprocess in the main process, one image per forward,
              tokens collected in memory
and, to find the bottleneck, each stage of the pipeline alone:
  decode      the decoding and resizing of the pipeline, nothing encoded: in the DataLoader workers,
              or, with JPEGs decoded on the device, their reading plus nvJPEG and the device resize
  write       float16 rows of the encoder's shape written into HDF5 shards, nothing encoded
On CUDA the encoder runs under autocast at --precision, as the pipeline does, and --decode-on-device
(auto, never, always: EncodeSettings.decode_on_device) says whether JPEGs are decoded by nvJPEG; run
once with never and once with auto to compare (the result names where JPEGs were decoded).
--textured adds sensor-like noise so that the JPEGs are about as large, and as slow to decode, as
photographs.
Figures go to docs/benchmarks.md.
"""

import argparse
import json
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

import ituning  # noqa: F401  (makes torchvision importable before open_clip is)
from ituning.backbones import BackboneSpec, load_vision_encoder
from ituning.images import open_rgb
from common import seconds_on
from ituning.device_jpeg import DECODE_ON_DEVICE, device_resize_crop, why_not_on_device
from ituning.encoding import EncodeSettings, image_loader, image_size, split_preprocess
from ituning.precision import autocast
from pipeline.features import FeatureSettings, encode_features
from storage.scenes import random_scene, render_scene


def render_one(job) -> None:
    """One scene as a JPEG; textured: plus noise, so it compresses and decodes like a photograph."""
    index, path, width, height, textured = job
    rng = random.Random(index)
    image = render_scene(random_scene(rng), size=max(width, height)).resize((width, height))
    if textured:
        noise = np.random.default_rng(index).integers(-24, 25, (height, width, 3), dtype=np.int16)
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    image.save(path, quality=90)


def render_images(folder: Path, count: int, width: int, height: int, textured: bool,
                  distinct: int = 0) -> list[tuple[str, Path]]:
    """`count` JPEGs; with `distinct`, only that many are rendered and the rest are hard links to
    them: files of the same size and decoding work, without minutes of rendering."""
    images = [(f"{index:06d}", folder / f"{index:06d}.jpg") for index in range(count)]
    rendered = min(count, distinct or count)
    jobs = [(index, path, width, height, textured) for index, (_, path) in enumerate(images[:rendered])]
    with ProcessPoolExecutor() as pool:
        list(pool.map(render_one, jobs, chunksize=64))
    for index, (_, path) in enumerate(images[rendered:], start=rendered):
        os.link(images[index % rendered][1], path)
    return images


def bare_encoder(encoder, images, batch_size: int, device: torch.device, precision: str) -> float:
    """The forward pass alone, on batches decoded, preprocessed and moved to the device beforehand."""
    pixels = torch.stack([encoder.preprocess(open_rgb(path)) for _, path in images])  # (N, 3, 224, 224)
    batches = [pixels[i : i + batch_size].to(device) for i in range(0, len(pixels), batch_size)]

    def encode_all():
        with torch.inference_mode(), autocast(device, precision):
            for batch in batches:
                encoder(batch).half()

    return len(images) / seconds_on(device, encode_all)


def decode_only(encoder, images, encode: EncodeSettings) -> float:
    """The pipeline's image loader alone: open, decode, resize, batch as uint8 (on the device where
    JPEGs are decoded there)."""
    batches, _ = image_loader(encoder, [(0, image_id, path) for image_id, path in images], encode)
    start = time.perf_counter()
    count = sum(len(pixels) for pixels, *_ in batches)
    if torch.device(encode.device).type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def jpeg_decoding(encoder, encode: EncodeSettings) -> str:
    """Where the pipeline decodes JPEGs with these settings, and why not on the device if it does not."""
    transform, _, _ = split_preprocess(encoder.preprocess, image_size(encoder))
    problem = why_not_on_device(torch.device(encode.device), device_resize_crop(transform))
    return "cpu (never)" if encode.decode_on_device == "never" else f"cpu ({problem})" if problem else "device"


def write_only(out_dir: Path, count: int, token_shape: tuple[int, int], batch_size: int) -> float:
    """float16 rows of the encoder's shape into an HDF5 file with one image per chunk, then fsync."""
    rows = np.random.default_rng(0).standard_normal((batch_size, *token_shape)).astype(np.float16)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "write-only.h5"
    start = time.perf_counter()
    with h5py.File(path, "w") as handle:
        tokens = handle.create_dataset("tokens", shape=(count, *token_shape), chunks=(1, *token_shape),
                                       dtype=np.float16)
        for first in range(0, count, batch_size):
            size = min(batch_size, count - first)
            tokens[first : first + size] = rows[:size]
    descriptor = os.open(path, os.O_RDONLY)
    os.fsync(descriptor)
    os.close(descriptor)
    elapsed = time.perf_counter() - start
    path.unlink()
    return count / elapsed


def pipeline(encoder, spec, images, out_dir: Path, encode: EncodeSettings) -> float:
    settings = FeatureSettings(shard_size=1024, encode=encode)
    start = time.perf_counter()
    report = encode_features(images, spec, out_dir, settings, encoder=encoder)
    elapsed = time.perf_counter() - start
    assert report.entry is not None and not report.unreadable and report.encoded_shards
    return len(images) / elapsed


def one_image_per_forward(encoder, images, device: torch.device, precision: str) -> float:
    start, kept = time.perf_counter(), []
    with torch.inference_mode(), autocast(device, precision):
        for _, path in images:
            pixels = encoder.preprocess(open_rgb(path)).unsqueeze(0).to(device)  # (1, 3, 224, 224)
            kept.append(encoder(pixels).half().cpu().numpy())
    return len(images) / (time.perf_counter() - start)


def ratios(rates: dict[str, float]) -> dict[str, float]:
    """The pipeline against the bare encoder and the per-image loop, and COCO's time, where measured."""
    found = {}
    if "pipeline" in rates and "encoder" in rates:
        found["pipeline_over_encoder"] = round(rates["pipeline"] / rates["encoder"], 3)
    if "pipeline" in rates and "per-image" in rates:
        found["pipeline_over_per_image"] = round(rates["pipeline"] / rates["per-image"], 3)
    if "pipeline" in rates:
        found["coco_123287_images_s"] = round(123_287 / rates["pipeline"], 1)
    return found


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--image-size", type=parse_size, default=(480, 480), help="WIDTHxHEIGHT (or one side)")
    parser.add_argument("--textured", action="store_true", help="photograph-like JPEG sizes and decode times")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bfloat16", help="compute precision on CUDA")
    parser.add_argument("--decode-on-device", default="auto", choices=DECODE_ON_DEVICE,
                        help="decode JPEGs with nvJPEG on the device (auto: where CUDA has it)")
    parser.add_argument("--distinct", type=int, default=0,
                        help="render only this many distinct JPEGs, the rest hard links to them (0: all distinct)")
    parser.add_argument("--only", default="encoder,decode,write,pipeline,per-image",
                        help="the measurements to run, comma-separated")
    parser.add_argument("--sample", type=int, default=0,
                        help="time the bare encoder and the one-image-per-forward loop on at most this many "
                             "images per round (0: all); the encoder's input is held in memory as float32")
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = BackboneSpec(args.model, None)
    encoder = load_vision_encoder(spec, args.device)
    encode = EncodeSettings(args.batch_size, args.workers, args.device, precision=args.precision,
                            decode_on_device=args.decode_on_device)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "images").mkdir()
        started = time.perf_counter()
        images = render_images(scratch / "images", args.images, *args.image_size, args.textured, args.distinct)
        rendering_s = time.perf_counter() - started
        jpeg_kib = sum(path.stat().st_size for _, path in images) / len(images) / 1024
        with torch.inference_mode():  # warm-up, and the shape of one image's tokens
            token_shape = tuple(encoder(torch.zeros(2, 3, *image_size(encoder), device=device)).shape[1:])
        seconds = dict.fromkeys(args.only.split(","), 0.0)
        counted, load_before = dict.fromkeys(seconds, 0), os.getloadavg()[0]
        for round_ in range(args.rounds):
            subset = images[round_ :: args.rounds]
            sample = subset[: args.sample or None]
            rates = {
                "encoder": (sample, lambda: bare_encoder(encoder, sample, args.batch_size, device, args.precision)),
                "decode": (subset, lambda: decode_only(encoder, subset, encode)),
                "write": (subset, lambda: write_only(scratch / "write", len(subset), token_shape, args.batch_size)),
                "pipeline": (subset, lambda: pipeline(encoder, spec, subset, scratch / f"cache-{round_}", encode)),
                "per-image": (sample, lambda: one_image_per_forward(encoder, sample, device, args.precision)),
            }
            for name, (measured, run) in rates.items():
                if name not in seconds:
                    continue
                seconds[name] += len(measured) / run()
                counted[name] += len(measured)
    rates = {name: counted[name] / spent for name, spent in seconds.items()}
    result = {
        "model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "precision": args.precision if device.type == "cuda" else "float32", "images": args.images,
        "image_size": "x".join(map(str, args.image_size)), "textured": args.textured,
        "mean_jpeg_kib": round(jpeg_kib, 1), "rendering_s": round(rendering_s, 1), "rounds": args.rounds,
        "decode_on_device": args.decode_on_device, "jpeg_decoding": jpeg_decoding(encoder, encode),
        "batch_size": args.batch_size, "workers": args.workers, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "images_per_s": {name: round(rate, 2) for name, rate in rates.items()},
        **ratios(rates),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

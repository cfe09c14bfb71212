"""Beam-5 decoding at GPT-2 size: cached, static-cache (eager and compiled) and the recomputing reference.

    .venv/bin/python benchmarks/beam_decoding.py [--size gpt2] [--images N] [--batch B] [--tokens 20]
    python benchmarks/beam_decoding.py --batch 500 --images 5000 --bf16      # on a GPU

The reference recomputes the whole prefix and every beam's visual keys/values at each step, as
ClipCap's beam search does; the cached path computes visual keys/values once per image and reuses
GPT-2's key/value cache; the static paths preallocate the cache and reorder beams in place
(ituning/static_decoding.py), the compiled one replaying its one-token forward as a CUDA graph on a
GPU. All images are decoded `--batch` at a time (the last batch may be partial); the reference,
an order of magnitude slower, decodes the first batch only. Each path is warmed up on one batch
first (for the compiled path: compiling and capturing). EOS is forbidden until the last step so
every path produces `--tokens` tokens.
"""

import argparse
from functools import partial

import torch

from common import CLIP_TOKENS, CLIP_WIDTH, gpt2_captioner, machine, seconds_on
from ituning.decoding import CachedStep, DecodingConfig, RecomputingStep, beam_search
from ituning.static_decoding import StaticCacheStep

PATHS = ("cached", "static", "compiled", "reference")


def steps(config: DecodingConfig) -> dict:
    return {
        "cached": CachedStep,
        "static": partial(StaticCacheStep, max_new_tokens=config.max_length, compile="never"),
        "compiled": partial(StaticCacheStep, max_new_tokens=config.max_length, compile="always"),
        "reference": RecomputingStep,
    }


def main():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--images", type=int, default=5000 if cuda else 8, help="images decoded per path")
    parser.add_argument("--batch", type=int, default=500 if cuda else 8, help="images per beam search")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over all images (median)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (GPU)")
    args = parser.parse_args()
    paths = [path for path in args.paths.split(",") if path]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {', '.join(PATHS)}")

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = gpt2_captioner(args.size).to(device, dtype).eval()
    visual = torch.randn(args.images, CLIP_TOKENS, CLIP_WIDTH, device=device, dtype=dtype)
    prompt = torch.tensor([[50256]], device=device)
    config = DecodingConfig(num_beams=args.beams, max_length=args.tokens, min_length=args.tokens - 1)

    def decode(step, images: int) -> list[list[int]]:
        tokens = []
        for start in range(0, images, args.batch):
            tokens += beam_search(model, visual[start : min(start + args.batch, images)], prompt, 50256, config, step)
        return tokens

    print(f"# {args.size}, {args.images} images in batches of {args.batch}, beam {args.beams}, {args.tokens} tokens, "
          f"{dtype}, {machine()}")
    print("| decoding | images | seconds | images/s | same tokens as cached |")
    print("|---|---|---|---|---|")
    outputs = {}
    for path in paths:
        step, images = steps(config)[path], min(args.images, args.batch) if path == "reference" else args.images
        decode(step, min(images, args.batch))  # warm-up: allocation, compiling, graph capture
        times = []
        for _ in range(args.repeats):
            times.append(seconds_on(device, lambda: outputs.__setitem__(path, decode(step, images))))
        seconds = sorted(times)[len(times) // 2]
        cached = outputs.get("cached")
        same = "-" if cached is None else f"{sum(a == b for a, b in zip(outputs[path], cached))}/{images}"
        print(f"| {path} | {images} | {seconds:.2f} | {images / seconds:.1f} | {same} |", flush=True)


if __name__ == "__main__":
    main()

"""Beam-5 decoding at GPT-2 size: cached decoding vs the recomputing reference.

    .venv/bin/python benchmarks/beam_decoding.py [--size gpt2] [--images 8] [--tokens 20]

The reference recomputes the whole prefix and every beam's visual keys/values at each step, as
ClipCap's beam search does; the cached path computes visual keys/values once per image and reuses
GPT-2's key/value cache. EOS is forbidden until the last step so both produce `--tokens` tokens.
"""

import argparse

import torch

from common import CLIP_TOKENS, CLIP_WIDTH, gpt2_captioner, machine, median_seconds
from ituning.decoding import CachedStep, DecodingConfig, RecomputingStep, beam_search


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (GPU)")
    args = parser.parse_args()

    model = gpt2_captioner(args.size).to(args.device).eval()
    visual = torch.randn(args.images, CLIP_TOKENS, CLIP_WIDTH, device=args.device)
    if args.bf16:
        model, visual = model.to(torch.bfloat16), visual.to(torch.bfloat16)
    prompt = torch.tensor([[50256]], device=args.device)
    config = DecodingConfig(num_beams=args.beams, max_length=args.tokens, min_length=args.tokens - 1)
    outputs = {}

    def decode(step):
        outputs[step] = beam_search(model, visual, prompt, 50256, config, step=step)
        if args.device == "cuda":
            torch.cuda.synchronize()

    cached = median_seconds(lambda: decode(CachedStep), args.repeats)
    recomputing = median_seconds(lambda: decode(RecomputingStep), max(1, args.repeats - 1))
    print(f"# {args.size}, {args.images} images, beam {args.beams}, {args.tokens} tokens, {machine()}")
    print("| decoding | seconds per batch | images/s |")
    print("|---|---|---|")
    for name, seconds in (("cached", cached), ("recomputing reference", recomputing)):
        print(f"| {name} | {seconds:.2f} | {args.images / seconds:.2f} |")
    same = outputs[CachedStep] == outputs[RecomputingStep]
    print(f"speed-up {recomputing / cached:.1f}x; identical tokens: {same}")


if __name__ == "__main__":
    main()

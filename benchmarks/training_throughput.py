"""Training-step benchmarks (random weights, nothing downloaded). Figures go to docs/benchmarks.md.

    .venv/bin/python benchmarks/training_throughput.py                 # both
    .venv/bin/python benchmarks/training_throughput.py throughput      # gpt2: cached features vs CLIP in the loop
    .venv/bin/python benchmarks/training_throughput.py dropping        # gpt2-large: drop 18 layers vs none

`dropping` runs each variant in its own process so that the peak resident memory (ru_maxrss)
belongs to that variant alone.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import ituning  # noqa: F401  (torchvision importable before transformers)
from ituning.model import ITuningCaptioner, ITuningConfig, trainable_parameters

CAPTION_TOKENS = 20


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("which", nargs="*", default=["throughput", "dropping"])
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.which[0] == "dropping-variant":
        print(json.dumps(dropping_variant(*map(int, args.which[1:]))))
        return
    for which in args.which:
        print(which, json.dumps({"throughput": throughput, "dropping": dropping}[which](), indent=1))


if __name__ == "__main__":
    main()

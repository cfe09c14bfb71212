"""Shared pieces of the benchmarks: a gpt2-size captioner with random weights, timing, memory."""

import platform
import resource
import statistics
import time
from datetime import date

import torch

import ituning  # noqa: F401  (torchvision compatibility before transformers)
from ituning.model import ITuningCaptioner, ITuningConfig

CLIP_TOKENS, CLIP_WIDTH = 197, 768  # ViT-B-16


def gpt2_captioner(size: str = "gpt2", drop_first: int = 0, seed: int = 0) -> ITuningCaptioner:
    """The real architecture with random weights (nothing is downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ituning.backbones import GPT2_ARCHITECTURES

    torch.manual_seed(seed)
    n_embd, n_layer, n_head = GPT2_ARCHITECTURES[size]
    language_model = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head))
    # Non-zero W_o so the image actually changes the predictions being timed.
    return ITuningCaptioner(language_model, CLIP_WIDTH, ITuningConfig(zero_init_output=False, drop_first=drop_first))


def median_seconds(run, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds_on(device: torch.device, run) -> float:
    """Wall time of run(), waiting for the device's queued work before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.machine()} {device}, torch {torch.__version__}, {date.today().isoformat()}"

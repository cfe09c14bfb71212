"""The micro-batch a training stage runs when its config says `micro_batch_size: auto`.

On a CUDA device the peak memory of one forward and backward pass is measured at two small sizes
on the worst micro-batch (every caption max_caption_tokens long, each from its own image): their
difference is what a caption adds, the rest is what the pass takes regardless. The micro-batch is
then the largest divisor of the effective batch whose predicted peak fits FREE_SHARE of the memory
free at that moment (after the model, and the data when held on the device, are loaded), leaving
room for the optimizer's state and the allocator's fragmentation. On other devices there is no
memory to measure, and the micro-batch is the largest divisor up to HOST_MICRO_BATCH.

The measured micro-batch proves itself before training starts (ituning/fast_paths.py): one
forward and backward pass of the worst micro-batch of the chosen size must run. If the probe or
that pass fails (out of memory: the prediction misjudged), the stage falls back to the plain rule,
the largest divisor up to HOST_MICRO_BATCH that runs, halving the size after each failed pass.
"""

from collections.abc import Callable

import torch

from ituning.data import CaptionBatch
from ituning.fast_paths import MICRO_BATCH
from ituning.model import ImageGroups

PROBE_SIZES = (4, 8)
FREE_SHARE = 0.8
HOST_MICRO_BATCH = 64


def largest_divisor_within(batch_size: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of batch_size for which fits(divisor) holds (1 if none does)."""
    return max((size for size in range(1, batch_size + 1) if batch_size % size == 0 and fits(size)), default=1)


def fitting_micro_batch(batch_size: int, budget_bytes: float, fixed_bytes: float, bytes_per_caption: float) -> int:
    """The largest divisor of batch_size whose predicted peak, fixed + size x per caption, fits the budget."""
    return largest_divisor_within(batch_size, lambda size: fixed_bytes + size * bytes_per_caption <= budget_bytes)


def worst_micro_batch(size: int, length: int, visual_shape: tuple[int, int], visual_dtype: torch.dtype,
                      device: torch.device) -> CaptionBatch:
    """`size` captions of `length` tokens, each from its own image: the most memory a micro-batch of
    that size can take (token values do not change the memory)."""
    input_ids = torch.zeros((size, length), dtype=torch.long, device=device)  # (B, T)
    visual = torch.zeros((size, *visual_shape), dtype=visual_dtype, device=device)  # (B, N, d_v)
    groups = ImageGroups.of(torch.arange(size), size).to(device)
    return CaptionBatch(input_ids, input_ids.clone(), torch.ones_like(input_ids), visual, groups.image_index, groups)


def peak_bytes(device: torch.device, run: Callable[[], None]) -> int:
    """The most memory allocated on a CUDA device while run() ran, above what was allocated before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measured_micro_batch(batch_size: int, device: torch.device, run_size: Callable[[int], None]) -> int:
    """The micro-batch for a CUDA device, from the peaks of run_size(size) at PROBE_SIZES."""
    small, large = PROBE_SIZES
    peaks = [peak_bytes(device, lambda size=size: run_size(size)) for size in PROBE_SIZES]
    per_caption = max(1.0, (peaks[1] - peaks[0]) / (large - small))
    fixed = max(0.0, peaks[0] - small * per_caption)
    free = torch.cuda.mem_get_info(device)[0]
    return fitting_micro_batch(batch_size, FREE_SHARE * free, fixed, per_caption)


def resolve_micro_batch(setting: int | str, batch_size: int, device: torch.device,
                        run_size: Callable[[int], None]) -> int:
    """The micro-batch a stage runs: its setting, or for auto the measured fit (CUDA), checked by
    running it, or the largest divisor of batch_size up to HOST_MICRO_BATCH (elsewhere)."""
    if setting != "auto":
        return setting
    host_rule = largest_divisor_within(batch_size, lambda size: size <= HOST_MICRO_BATCH)
    if not MICRO_BATCH.available(device.type == "cuda") or MICRO_BATCH.fell_back:
        return host_rule

    def measured_and_run() -> int:
        size = measured_micro_batch(batch_size, device, run_size)
        run_size(size)  # the chosen size must fit when actually run, not only by the prediction
        return size

    used, size = MICRO_BATCH.first_use("auto", measured_and_run, lambda: None, lambda measured, plain: "")
    return size if used else largest_that_runs(batch_size, host_rule, device, run_size)


def largest_that_runs(batch_size: int, start: int, device: torch.device, run_size: Callable[[int], None]) -> int:
    """The largest divisor of batch_size up to `start` whose pass runs, halving after each failure
    (1 is taken as it is: a smaller batch does not exist)."""
    size = start
    while size > 1:
        try:
            run_size(size)
            return size
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            size = largest_divisor_within(batch_size, lambda candidate, limit=size // 2: candidate <= limit)
    return size

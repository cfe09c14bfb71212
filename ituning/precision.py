"""Compute precision: one vocabulary for encoding images and for training, and the autocast it means.

`float32` runs in full precision; `bfloat16` and `float16` run under CUDA autocast (on the CPU they
are full precision too); `auto` is bfloat16 on a CUDA device that supports it, float32 elsewhere.
Configurations written before this vocabulary said `bf16` and `fp32`; those spellings still read.
"""

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
FORMER_SPELLINGS = {"bf16": "bfloat16", "fp32": "float32"}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def normalise_precision(precision: str) -> str:
    """A precision in today's spelling; ValueError for one that is not a precision."""
    precision = FORMER_SPELLINGS.get(precision, precision)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(device: str | torch.device, precision: str) -> str:
    """The precision `precision` means on `device`: itself, or for `auto` bfloat16 on a CUDA device
    that supports it and float32 everywhere else."""
    precision = normalise_precision(precision)
    if precision != "auto":
        return precision
    return "bfloat16" if _supports_bfloat16(torch.device(device)) else "float32"


def autocast(device: str | torch.device, precision: str):
    """The context to compute in: CUDA autocast at a reduced precision, else nothing."""
    device = torch.device(device)
    precision = resolve_precision(device, precision)
    if device.type != "cuda" or precision == "float32":
        return nullcontext()
    return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])


def _supports_bfloat16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()

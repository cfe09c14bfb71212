"""Damage done to a finished feature shard, as a full disk or a stray write would do it."""

from pathlib import Path

import h5py
import numpy as np


def truncate(shard: Path):
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def overwrite_tokens_in_place(shard: Path, row: int = 2):
    """Finite values over one token row's bytes: the file still opens and holds no NaN/Inf."""
    with h5py.File(shard, "r") as handle:
        offset = handle["tokens"].id.get_chunk_info(row).byte_offset
    with open(shard, "r+b") as raw:
        raw.seek(offset + 64)
        raw.write(np.full(16, 0.5, dtype=np.float16).tobytes())

"""Shards of the feature cache: HDF5 files of frozen vision tokens, each with a single writer.

A split's image list (sorted by image id) is cut into fixed-size shards; shard k holds images
[k * shard_size, (k + 1) * shard_size). Layout of shard-KKKKK.h5:

  tokens              (rows, tokens, width) float16 by default; one chunk per image, so one image is one read
  image_ids           (rows,) UTF-8, in image-list order
  unreadable_ids      images of the shard that could not be decoded (not in `tokens`) ...
  unreadable_reasons  ... and why
  attrs["identity"]   JSON of what the cache was built from (encoder, weights, image list, settings)
  attrs["shard_index"], attrs["assigned_images"]

A shard is written as shard-KKKKK.h5.tmp-PID and renamed only once it is complete and re-read, so a
crash leaves either a finished shard or a temporary file that the next run discards. Just before the
rename, the sha256 of the finished file goes beside it into shard-KKKKK.h5.sha256 (sha256sum's
format), so damage done to the file later (truncation, bytes overwritten) can be told.

The ShardWriter is a thread with a bounded queue: whoever encodes hands it batches of token arrays
and goes on with the next batch while this one is written, so the encoder does not wait on the disk.
What encodes the images is not known here (pipeline/features.py composes the two).
"""

import hashlib
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from storage.atomic import sync_file, sync_folder, write_atomically

SHARD_NAME = "shard-{:05d}.h5"
CHECKSUM_SUFFIX = ".sha256"
STRING = h5py.string_dtype()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardPlan:
    images: tuple[tuple[str, Path], ...]  # (image_id, path), sorted by image_id
    shard_size: int

    @property
    def count(self) -> int:
        return -(-len(self.images) // self.shard_size)

    def items(self, shard: int) -> tuple[tuple[str, Path], ...]:
        return self.images[shard * self.shard_size : (shard + 1) * self.shard_size]

    def path(self, out_dir: Path, shard: int) -> Path:
        return out_dir / SHARD_NAME.format(shard)


@dataclass
class ShardBatch:
    """Encoded images of one shard, in image-list order."""

    shard: int
    image_ids: list[str]
    errors: list[str]  # "" for an encoded image, else why it could not be decoded (its row is not kept)
    tokens: object  # (B, tokens, width), anything np.asarray takes
    ready: object = None  # if given, tokens are complete once its .synchronize() returns (an asynchronous copy)


@dataclass
class OpenShard:
    index: int
    temp_path: Path
    file: h5py.File
    assigned: int
    rows: int = 0
    image_ids: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)


class NonFiniteFeatures(RuntimeError):
    """The encoder produced NaN or Inf; such rows are never written."""


class ShardWriter(threading.Thread):
    """Consumes encoded batches in order and finishes each shard once all its images arrived."""

    def __init__(self, out_dir: Path, plan: ShardPlan, identity: dict, dtype: str, queue_batches: int):
        super().__init__(name="feature-shard-writer", daemon=True)
        self.out_dir, self.plan, self.identity, self.dtype = out_dir, plan, identity, np.dtype(dtype)
        self.queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self.error: BaseException | None = None
        self.finished: list[int] = []
        self.open: OpenShard | None = None

    def submit(self, batch: ShardBatch | None) -> None:
        while True:
            if self.error is not None:
                raise RuntimeError(f"the shard writer failed: {self.error}") from self.error
            try:
                return self.queue.put(batch, timeout=0.5)
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            while (batch := self.queue.get()) is not None:
                self._write(batch)
        except BaseException as error:  # reported to the encoding loop by submit()/close()
            self.error = error
        if self.open is not None:  # unfinished: the run failed or was abandoned
            self.open.file.close()
            self.open.temp_path.unlink(missing_ok=True)
            self.open = None

    def abandon(self) -> None:
        """Stop after the batches already queued; an unfinished shard's temporary file is removed."""
        if self.is_alive():
            self.queue.put(None)
            self.join()

    def close(self) -> list[int]:
        self.submit(None)
        self.join()
        if self.error is not None:
            raise RuntimeError(f"the shard writer failed: {self.error}") from self.error
        return self.finished

    def _write(self, batch: ShardBatch) -> None:
        if batch.ready is not None:
            batch.ready.synchronize()
        tokens = np.asarray(batch.tokens)
        shard = self.open if self.open is not None else self._start(batch.shard, tokens.shape[1:])
        good = [row for row, error in enumerate(batch.errors) if not error]
        for row, error in enumerate(batch.errors):
            if error:
                shard.unreadable[batch.image_ids[row]] = error
        rows = tokens[good]
        if not np.isfinite(rows).all():
            bad = [batch.image_ids[good[i]] for i in np.flatnonzero(~np.isfinite(rows).all(axis=(1, 2)))]
            raise NonFiniteFeatures(f"shard {shard.index}: non-finite tokens for {bad}")
        shard.file["tokens"][shard.rows : shard.rows + len(good)] = rows
        shard.rows += len(good)
        shard.image_ids += [batch.image_ids[row] for row in good]
        if shard.rows + len(shard.unreadable) == shard.assigned:
            self._finish(shard)

    def _start(self, index: int, token_shape: tuple[int, int]) -> OpenShard:
        final = self.plan.path(self.out_dir, index)
        temp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        handle = h5py.File(temp, "w")
        assigned = len(self.plan.items(index))
        handle.create_dataset("tokens", shape=(assigned, *token_shape), maxshape=(None, *token_shape),
                              chunks=(1, *token_shape), dtype=self.dtype)
        self.open = OpenShard(index, temp, handle, assigned)
        return self.open

    def _finish(self, shard: OpenShard) -> None:
        handle = shard.file
        handle["tokens"].resize(shard.rows, axis=0)
        handle.create_dataset("image_ids", data=shard.image_ids, dtype=STRING)
        handle.create_dataset("unreadable_ids", data=list(shard.unreadable), dtype=STRING)
        handle.create_dataset("unreadable_reasons", data=list(shard.unreadable.values()), dtype=STRING)
        handle.attrs.update(shard_attrs(self.identity, shard.index, shard.assigned))
        handle.flush()
        handle.close()
        self.open = None
        sync_file(shard.temp_path)
        check_shard(shard.temp_path, self.identity, shard.index, shard.assigned)
        final = self.plan.path(self.out_dir, shard.index)
        write_checksum(final, file_sha256(shard.temp_path))
        os.replace(shard.temp_path, final)
        sync_folder(self.out_dir)
        self.finished.append(shard.index)
        log.info("shard %d: %d rows, %d unreadable", shard.index, shard.rows, len(shard.unreadable))


def shard_attrs(identity: dict, index: int, assigned: int) -> dict:
    readable = {key: json.dumps(value) if isinstance(value, list) else value for key, value in identity.items()}
    return {**readable, "identity": json.dumps(identity, sort_keys=True), "shard_index": index,
            "assigned_images": assigned}


def read_identity(path: Path) -> dict | None:
    """The identity a finished shard was built with; None when it is not a readable shard."""
    try:
        with h5py.File(path, "r") as handle:
            return json.loads(handle.attrs["identity"])
    except (OSError, KeyError, ValueError):
        return None


def shard_contents(path: Path) -> tuple[list[str], dict[str, str]]:
    """A finished shard's image ids and its unreadable images (id -> reason)."""
    with h5py.File(path, "r") as handle:
        unreadable = dict(zip(handle["unreadable_ids"].asstr()[:], handle["unreadable_reasons"].asstr()[:]))
        return list(handle["image_ids"].asstr()[:]), unreadable


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checksum_path(shard: Path) -> Path:
    return shard.with_name(shard.name + CHECKSUM_SUFFIX)


def read_checksum(shard: Path) -> str | None:
    """The sha256 recorded beside a shard; None when there is none (a shard of an earlier version)."""
    try:
        digest = checksum_path(shard).read_text().split(maxsplit=1)[0]
    except (OSError, IndexError):
        return None
    return digest if len(digest) == 64 else None


def write_checksum(shard: Path, digest: str) -> None:
    write_atomically(checksum_path(shard), f"{digest}  {shard.name}\n")


def check_shard(path: Path, identity: dict, index: int, assigned: int) -> None:
    """Re-read a written shard's structure before it may take its final name."""
    with h5py.File(path, "r") as handle:
        rows, unreadable = len(handle["tokens"]), len(handle["unreadable_ids"])
        problems = [
            problem for problem, failed in (
                ("identity differs", json.loads(handle.attrs["identity"]) != identity),
                ("wrong shard index", int(handle.attrs["shard_index"]) != index),
                ("row count", rows + unreadable != assigned or len(handle["image_ids"]) != rows),
            ) if failed
        ]
    if problems:
        raise RuntimeError(f"{path}: shard check failed: {', '.join(problems)}")

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

Images are decoded by ituning.images.open_rgb (upright, 16-bit scaled, over-limit images
unreadable). One whose shorter side exceeds REDUCE_ABOVE (4) times the model's input side is decoded
at reduced size (JPEG DCT scaling, then a box reduction, to at least twice the input side) before
the preprocessing resize, so its cached pixels come from that reduced decode; every other image is
decoded exactly as stored.

Decoding and preprocessing run in DataLoader worker processes (in the process itself where that
one may not have children, e.g. a Dask worker), which send uint8 images (scaling and normalisation,
the same arithmetic, happen on the device); the encoder runs in the main thread;
a writer thread with a bounded queue writes to disk, so the encoder does not wait on the disk.
"""

import hashlib
import json
import logging
import os
import queue
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ituning.data import usable_workers, worker_start_method
from ituning.images import UnreadableImage, open_rgb

SHARD_NAME = "shard-{:05d}.h5"
CHECKSUM_SUFFIX = ".sha256"
STRING = h5py.string_dtype()
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
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


@dataclass(frozen=True)
class EncodeSettings:
    batch_size: int = 64
    num_workers: int = 2
    device: str = "cpu"
    dtype: str = "float16"  # storage dtype
    precision: str = "auto"  # compute: float32, or bfloat16 / float16 autocast on CUDA; auto picks
    queue_batches: int = 4  # encoded batches that may wait for the writer


class ImageFiles(Dataset):
    """(shard, image_id, path) -> (pixels, shard, image_id, error); an unreadable file gives zeros
    and its reason instead of stopping the run. `min_side`: the model's input side (see open_rgb)."""

    def __init__(self, items, transform, blank: torch.Tensor, min_side: int | None = None):
        self.items, self.transform, self.blank, self.min_side = items, transform, blank, min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        shard, image_id, path = self.items[index]
        try:
            return self.transform(open_rgb(path, self.min_side)), shard, image_id, ""
        except UnreadableImage as error:
            return self.blank, shard, image_id, str(error)


TO_TENSOR_STEPS = {"ToTensor", "MaybeToTensor"}


class BytePixels:
    """The PIL steps of a preprocessing transform, then the image as uint8 (3, H, W)."""

    def __init__(self, pil_steps):
        self.pil_steps = pil_steps

    def __call__(self, image) -> torch.Tensor:
        array = np.array(self.pil_steps(image), dtype=np.uint8, copy=True)  # (H, W, 3)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


@dataclass(frozen=True)
class ScaleAndNormalize:
    """ToTensor's scaling and Normalize, on a uint8 batch already on the device: the same
    arithmetic, so the same pixels as the whole transform run on the CPU."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import normalize

        return normalize(pixels.to(torch.float32).div(255), self.mean, self.std)


def split_preprocess(preprocess, size: tuple[int, int]):
    """(worker transform, blank image, device step). Where the transform ends in ToTensor and
    Normalize, workers send uint8 images (a quarter of the bytes between processes and to the
    GPU) and the device step finishes them; otherwise workers run all of it and the step is None."""
    from torchvision.transforms import Compose

    steps = list(getattr(preprocess, "transforms", ()))
    if len(steps) >= 2 and type(steps[-2]).__name__ in TO_TENSOR_STEPS and hasattr(steps[-1], "std"):
        finish = ScaleAndNormalize(tuple(steps[-1].mean), tuple(steps[-1].std))
        return BytePixels(Compose(steps[:-2])), torch.zeros(3, *size, dtype=torch.uint8), finish
    return preprocess, torch.zeros(3, *size), None


@dataclass
class EncodedBatch:
    shard: int
    image_ids: list[str]
    errors: list[str]
    tokens: torch.Tensor  # on the host; complete once `ready` has fired (CUDA) or at once (CPU)
    ready: object = None


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

    def submit(self, batch: EncodedBatch | None) -> None:
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

    def _write(self, batch: EncodedBatch) -> None:
        if batch.ready is not None:
            batch.ready.synchronize()
        tokens = batch.tokens.numpy()
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
        _fsync(shard.temp_path)
        check_shard(shard.temp_path, self.identity, shard.index, shard.assigned)
        final = self.plan.path(self.out_dir, shard.index)
        write_checksum(final, file_sha256(shard.temp_path))
        os.replace(shard.temp_path, final)
        _fsync(self.out_dir)
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


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


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
    path = checksum_path(shard)
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    temp.write_text(f"{digest}  {shard.name}\n")
    os.replace(temp, path)


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


def encode_shards(encoder, plan: ShardPlan, shards: list[int], out_dir: Path, identity: dict,
                  settings: EncodeSettings) -> list[int]:
    """Encode and write the given shards (each complete, or not at all); returns those finished."""
    items = [(shard, image_id, path) for shard in shards for image_id, path in plan.items(shard)]
    if not items:
        return []
    loader, finish = _image_loader(encoder, plan, shards, items, settings)
    writer = ShardWriter(out_dir, plan, identity, settings.dtype, settings.queue_batches)
    writer.start()
    device, storage_dtype = torch.device(settings.device), STORAGE_DTYPES[settings.dtype]
    try:
        with torch.inference_mode(), autocast(device, settings.precision):
            for pixels, shard, image_ids, errors in loader:
                pixels = pixels.to(device, non_blocking=True)
                pixels = finish(pixels) if finish is not None else pixels  # (B, 3, H, W) float
                tokens = encoder(pixels).to(storage_dtype)  # (B, 1 + P, width)
                host, ready = _to_host(tokens)
                writer.submit(EncodedBatch(int(shard[0]), list(image_ids), list(errors), host, ready))
    except BaseException:
        writer.abandon()
        raise
    return writer.close()


def _image_loader(encoder, plan: ShardPlan, shards: list[int], items, settings: EncodeSettings):
    batches, start = [], 0
    for shard in shards:  # batches never cross a shard boundary
        size = len(plan.items(shard))
        batches += [list(range(i, min(i + settings.batch_size, start + size)))
                    for i in range(start, start + size, settings.batch_size)]
        start += size
    size = image_size(encoder)
    transform, blank, finish = split_preprocess(encoder.preprocess, size)
    workers = usable_workers(settings.num_workers)
    loader = DataLoader(ImageFiles(items, transform, blank, min(size)), batch_sampler=batches, num_workers=workers,
                        pin_memory=torch.device(settings.device).type == "cuda", persistent_workers=False,
                        multiprocessing_context=worker_start_method(workers))
    return loader, finish


def autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "float32":
        return nullcontext()
    return torch.autocast("cuda", dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[precision])


def image_size(encoder) -> tuple[int, int]:
    size = encoder.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def _to_host(tokens: torch.Tensor):
    """A host copy of the tokens; on CUDA an asynchronous copy into pinned memory plus its event,
    so the next batch is launched while this one travels."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

"""The feature cache's folders and bookkeeping: which caches exist, which shards are intact, who may
encode which shard, the entry point, and reading the tokens back. Nothing here encodes an image
(pipeline/features.py does, through ituning/encoding.py); the shard files are storage/feature_shards.py.

A cache folder holds fixed-size HDF5 shards and one entry point, features.json, written only when
every shard is finished. It names the shards, their image ids and checksums, and the cache
identity: encoder name, pretrained tag, a digest of the encoder's weights, image size, a
fingerprint of the image list (storage/image_lists.py) and the storage settings.

A split keeps one cache per encoder and precision, side by side:
workspace/features/<dataset>/<split>/<encoder>/<precision>/, the precision being the compute
precision and the storage dtype, e.g. `bfloat16-float16` (bfloat16 autocast on a GPU, stored as
float16) or `float32-float16` (on the CPU). Encoding on another device therefore builds or reuses
the cache of that device's precision and leaves the other one alone.

- A finished cache whose identity matches is reused as it is.
- A cache built from another encoder or image list is deleted and rebuilt, never mixed.
- A cache that an earlier version built in <encoder>/ itself is still read for the precision it
  was made at, and moved into its precision's folder the first time that precision is built.
- An interrupted build resumes: finished shards are kept, only missing ones are encoded.
- Shards are independent: a build may cover a subset of them, so several processes or GPUs can
  fill one cache; whoever finishes last writes the entry point.
- A process encodes a shard only while it holds the shard's lock, shard-KKKKK.h5.lock
  (storage/locks.py). A second run wanting a shard that another one is encoding stops with
  CacheBusy, naming that process; runs on different shards go on side by side. A killed run's
  locks are free at once.
- Every finished shard has its sha256 beside it (shard-KKKKK.h5.sha256), copied into the entry
  point. Building checks the shards it is asked for against them and encodes a damaged one
  (truncated, overwritten, unreadable) again; storage/feature_checks.py checks every shard.
  Readers do not hash: opening or reading a damaged shard raises ShardUnreadable, naming the file.
  A shard of an earlier version has no checksum; the next build records it.
"""

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from storage.atomic import write_atomically
from storage.feature_shards import (
    ShardPlan, checksum_path, file_sha256, read_checksum, read_identity, shard_contents, write_checksum,
)
from storage.locks import FileLock, LockHeld
from storage.workspace import LOCAL_DIR, in_workspace

ENTRY_NAME = "features.json"
FORMAT_VERSION = 1
# When the precision asked for has no cache, readers take another, most precise first.
COMPUTE_PRECISIONS = ("float32", "bfloat16", "float16")
STORAGE_DTYPES = ("float32", "float16")
log = logging.getLogger(__name__)


class CacheBusy(LockHeld):
    """Another process is encoding a shard this run would encode."""


class ShardUnreadable(OSError):
    """A shard of a finished cache cannot be opened or read: it was truncated or damaged."""

    def __init__(self, message: str):
        # A DataLoader re-raises a worker's error as type(error)(its traceback text): keep the message alone.
        super().__init__(message.rpartition(f"{type(self).__name__}: ")[2].strip() or message)


@dataclass
class BuildReport:
    entry: Path | None  # None until every shard of the cache is finished
    images: int
    encoded_shards: list[int] = field(default_factory=list)
    reused_shards: list[int] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # image_id -> reason, over the whole cache
    discarded_stale: bool = False  # an earlier cache from another encoder or image list was removed
    damaged: dict[str, str] = field(default_factory=dict)  # shard file -> why it was removed, to be encoded again


def precision_folder(compute_precision: str, dtype: str) -> str:
    """The folder name of a precision: the compute precision, then the storage dtype, e.g. `bfloat16-float16`."""
    return f"{compute_precision}-{dtype}"


def identity_precision_folder(identity: dict) -> str:
    return precision_folder(identity["compute_precision"], identity["dtype"])


def find_entry(encoder_dir: Path, precision: str) -> Path:
    """The entry point to read in an encoder folder: the finished cache of the `precision` folder;
    else a finished one of another precision (the most precise, with a warning); else where the
    first would be."""
    finished = finished_caches(encoder_dir)
    exact = [entry for entry, key in finished if key == precision]
    if exact or not finished:
        return exact[0] if exact else Path(encoder_dir) / precision / ENTRY_NAME
    entry, key = min(finished, key=lambda found: precision_rank(found[1]))
    log.warning("%s: no feature cache at %s; reading the one at %s", encoder_dir, precision, key)
    return entry


def finished_caches(encoder_dir: Path) -> list[tuple[Path, str]]:
    """(entry point, precision folder) of the encoder folder's finished caches: those in precision
    folders, then one an earlier version left in the encoder folder itself."""
    found = []
    for entry in [*sorted(Path(encoder_dir).glob(f"*/{ENTRY_NAME}")), Path(encoder_dir) / ENTRY_NAME]:
        identity = entry_identity(entry)
        if identity is not None:
            found.append((entry, identity_precision_folder(identity)))
    return found


def precision_rank(folder: str) -> tuple[int, int]:
    compute, _, dtype = folder.partition("-")
    return (COMPUTE_PRECISIONS.index(compute) if compute in COMPUTE_PRECISIONS else len(COMPUTE_PRECISIONS),
            STORAGE_DTYPES.index(dtype) if dtype in STORAGE_DTYPES else len(STORAGE_DTYPES))


def sorted_unique_images(images) -> tuple[tuple[str, Path], ...]:
    """(image_id, path) pairs sorted by image id; ValueError when an id appears twice."""
    ordered = tuple(sorted((str(image_id), Path(path)) for image_id, path in images))
    duplicates = sorted({a for (a, _), (b, _) in zip(ordered, ordered[1:]) if a == b})
    if duplicates:
        raise ValueError(f"duplicate image ids in the image list: {duplicates[:5]}")
    return ordered


def adopt_earlier_cache(out_dir: Path) -> list[str]:
    """Move the files of out_dir's precision that an earlier version wrote straight into the
    encoder folder (out_dir's parent) into out_dir, the entry point last; returns their names.
    Other precisions' files stay, still readable, until their own precision is built. A file
    another process moved first, or one whose name out_dir already holds, is left alone."""
    moved = []
    for path in [*sorted(out_dir.parent.glob("shard-*.h5")), out_dir.parent / ENTRY_NAME]:
        identity = entry_identity(path) if path.name == ENTRY_NAME else read_identity(path)
        if identity is None or identity_precision_folder(identity) != out_dir.name or (out_dir / path.name).exists():
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, out_dir / path.name)
        except FileNotFoundError:
            continue
        moved.append(path.name)
    if moved:
        log.info("feature cache %s: moved %d file(s) of an earlier layout in", out_dir, len(moved))
    return moved


def discard_stale(out_dir: Path, identity: dict) -> tuple[bool, dict[str, str]]:
    """Delete the entry point and every finished shard built with a different identity, and every
    shard that cannot be opened; returns (whether any was stale, {unreadable shard: why}). A shard
    whose lock another process holds is left to it: that one is encoding it again. Temporary files
    stay too: each run clears its own shards' leftovers, under their locks."""
    entry, stale, unreadable = out_dir / ENTRY_NAME, False, {}
    if entry.is_file() and entry_identity(entry) != identity:
        entry.unlink(missing_ok=True)
        stale = True
    for path in sorted(out_dir.glob("shard-*.h5")):
        found = read_identity(path)
        if found == identity:
            continue
        with FileLock(lock_path(path)) as lock:
            if not lock.acquire() or not path.is_file() or (found := read_identity(path)) == identity:
                continue
            if found is None:
                unreadable[path.name] = f"cannot be read ({_open_error(path)})"
                log.warning("feature cache %s: %s %s: removed, to be encoded again", out_dir, path.name,
                            unreadable[path.name])
            stale = stale or found is not None
            remove_shard(path)
    if stale:
        log.warning("feature cache %s was built from another encoder or image list: rebuilding", out_dir)
    return stale, unreadable


def damaged_shards(out_dir: Path, plan: ShardPlan, shards: list[int]) -> dict[str, str]:
    """{shard file: why} for the given finished shards whose bytes differ from their checksum."""
    sums, damaged = entry_checksums(out_dir / ENTRY_NAME), {}
    for path in (plan.path(out_dir, index) for index in shards):
        if _checksum_differs(path, sums):
            damaged[path.name] = "checksum mismatch: its bytes changed after it was written"
            log.warning("feature cache %s: %s: %s: encoding it again", out_dir, path.name, damaged[path.name])
    return damaged


def shards_to_encode(out_dir: Path, plan: ShardPlan, wanted: list[int], damaged: dict[str, str]) -> list[int]:
    """Those of `wanted` that are damaged or not finished."""
    return [k for k in wanted if plan.path(out_dir, k).name in damaged or not plan.path(out_dir, k).is_file()]


def _checksum_differs(path: Path, sums: dict[str, str]) -> bool:
    recorded = sums.get(path.name) or read_checksum(path)
    return path.is_file() and recorded is not None and file_sha256(path) != recorded


def lock_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".lock")


@contextmanager
def lock_shards(out_dir: Path, plan: ShardPlan, shards: list[int]):
    """Hold the locks of these shards, or raise CacheBusy naming the process that holds one."""
    with ExitStack() as held:
        for index in shards:
            lock = held.enter_context(FileLock(lock_path(plan.path(out_dir, index))))
            if not lock.acquire():
                holder = lock.holder()
                raise CacheBusy(f"another process is building this split: {holder or 'a process'} "
                                f"(it holds {lock.path.name} in {out_dir})", holder)
        yield


def clear_for_encoding(out_dir: Path, plan: ShardPlan, shards: list[int], damaged: dict[str, str]) -> list[int]:
    """Under the shards' locks: remove their temporary files and their damaged finished files (if
    still the damaged ones), and the entry point if any is to be encoded; returns those to encode."""
    for index in shards:
        path = plan.path(out_dir, index)
        for temp in [*out_dir.glob(f"{path.name}.tmp-*"), *out_dir.glob(f"{checksum_path(path).name}.tmp-*")]:
            temp.unlink(missing_ok=True)  # left by an interrupted run
        if path.name in damaged and _checksum_differs(path, entry_checksums(out_dir / ENTRY_NAME)):
            remove_shard(path)  # still the damaged file, not one another run has encoded since
    missing = [index for index in shards if not plan.path(out_dir, index).is_file()]
    if missing:
        (out_dir / ENTRY_NAME).unlink(missing_ok=True)  # the cache is unfinished again
    return missing


def remove_left_locks(out_dir: Path) -> None:
    """Remove the lock files that killed runs left behind (their locks are free)."""
    for path in out_dir.glob("shard-*.h5.lock"):
        lock = FileLock(path)
        if lock.acquire():
            lock.release()


def remove_shard(path: Path) -> None:
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def finish_entry(out_dir: Path, plan: ShardPlan, identity: dict) -> Path | None:
    """The entry point once every shard is finished (written, with the left locks removed, unless it
    is already current); None while a shard is missing."""
    entry = out_dir / ENTRY_NAME
    if not all(plan.path(out_dir, k).is_file() for k in range(plan.count)):
        return None
    if not entry_is_current(entry, plan, identity):
        entry = write_entry(out_dir, plan, identity)
        remove_left_locks(out_dir)
    return entry


def write_entry(out_dir: Path, plan: ShardPlan, identity: dict) -> Path:
    """The entry point over every shard, with their checksums; a shard without one (of an earlier
    version) gets it recorded now."""
    shards = []
    for index in range(plan.count):
        path = plan.path(out_dir, index)
        image_ids, unreadable = shard_contents(path)
        digest = read_checksum(path)
        if digest is None:
            digest = file_sha256(path)
            write_checksum(path, digest)
            log.info("feature cache %s: recorded the checksum of %s", out_dir, path.name)
        shards.append({"file": path.name, "image_ids": image_ids, "unreadable": unreadable, "sha256": digest})
    entry = out_dir / ENTRY_NAME
    write_atomically(entry, json.dumps({"identity": identity, "shards": shards}))
    return entry


def entry_checksums(entry: Path) -> dict[str, str]:
    """{shard file: sha256} as an entry point records them (none for one of an earlier version)."""
    try:
        shards = json.loads(Path(entry).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}
    return {shard["file"]: shard["sha256"] for shard in shards if shard.get("sha256")}


def entry_is_current(entry: Path, plan: ShardPlan, identity: dict) -> bool:
    """A finished entry point of this identity that records each shard's checksum, the one beside it."""
    if entry_identity(entry) != identity:
        return False
    sums = entry_checksums(entry)
    beside = [read_checksum(plan.path(entry.parent, index)) for index in range(plan.count)]
    return all(digest is not None and sums.get(plan.path(entry.parent, index).name) == digest
               for index, digest in enumerate(beside))


def entry_identity(entry: Path) -> dict | None:
    """The identity an entry point records; None when it is missing or unreadable."""
    try:
        return json.loads(Path(entry).read_text())["identity"]
    except (OSError, ValueError, KeyError):
        return None


def build_report(plan: ShardPlan, out_dir: Path, entry: Path | None, reused=(), encoded=()) -> BuildReport:
    unreadable = {}
    for index in [*reused, *encoded]:
        unreadable.update(shard_contents(plan.path(out_dir, index))[1])
    return BuildReport(entry, len(plan.images), list(encoded), list(reused), unreadable)


class FeatureReader(Mapping):
    """image_id -> (tokens, width) array, read from the shards on demand.

    Picklable: shard files are opened lazily, once per process, on first use; a copy in a
    DataLoader worker (forked or spawned) opens its own handles. Nothing is read in bulk."""

    def __init__(self, entry: Path):
        self.entry = Path(entry)
        manifest = json.loads(self.entry.read_text())
        self.attrs: dict = manifest["identity"]
        self.shard_files = [self.entry.parent / shard["file"] for shard in manifest["shards"]]
        self.shard_image_ids: list[list[str]] = [shard["image_ids"] for shard in manifest["shards"]]
        self.image_ids: list[str] = [i for shard in self.shard_image_ids for i in shard]
        self.unreadable = {i: why for shard in manifest["shards"] for i, why in shard["unreadable"].items()}
        self._where = {image_id: (index, row) for index, shard in enumerate(manifest["shards"])
                       for row, image_id in enumerate(shard["image_ids"])}
        self._handles: dict = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self):
        return iter(self.image_ids)

    def __contains__(self, image_id) -> bool:
        return image_id in self._where

    def __getitem__(self, image_id: str) -> np.ndarray:
        shard, row = self._where[image_id]
        try:
            return self._tokens(shard)[row]
        except (OSError, KeyError) as error:  # h5py's errors name no file
            raise self._unreadable(shard, error) from error

    def _unreadable(self, shard: int, error: Exception) -> ShardUnreadable:
        return ShardUnreadable(f"{self.shard_files[shard]}: cannot read this feature shard ({error}); it is "
                               f"damaged or truncated. Encode it again with `{rebuild_command(self.entry)}`; "
                               f"`ituning features verify` with the same options names every damaged shard")

    def shard_blocks(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """(image ids, tokens (rows, tokens, width)) of each shard in turn: the whole cache read in
        large sequential pieces, for loading it all at once."""
        for shard, image_ids in enumerate(self.shard_image_ids):
            try:
                tokens = self._tokens(shard)[:]
            except (OSError, KeyError) as error:
                raise self._unreadable(shard, error) from error
            yield image_ids, tokens

    def _tokens(self, shard: int):
        if self._pid != os.getpid():  # inherited through fork: the parent's handles are not ours
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = h5py.File(self.shard_files[shard], "r")["tokens"]
        return self._handles[shard]

    def close(self) -> None:
        if self._pid == os.getpid():
            for tokens in self._handles.values():
                tokens.file.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rebuild_command(entry: Path) -> str:
    """The `ituning features` command that builds the cache of `entry` again (dataset, split and
    workspace read from its place, workspace/features/DATASET/SPLIT/ENCODER[/PRECISION]/)."""
    cache, identity = Path(entry).parent, entry_identity(entry) or {}
    features = next((folder for folder in cache.parents if folder.name == "features"), None)
    where = cache.relative_to(features).parts if features else ()
    command = f"ituning features --dataset {where[0] if where else 'DATASET'} --split {where[1] if where else 'SPLIT'}"
    if features:
        command += f" --workspace {features.parent}"
    if identity.get("encoder_name"):
        name, pretrained = identity["encoder_name"], identity["encoder_pretrained"] or "none"
        local = name[len(LOCAL_DIR):] if name.startswith(LOCAL_DIR) else None
        if features and local and not os.path.isabs(local):  # named relative to the workspace: runnable from anywhere
            name = LOCAL_DIR + str(in_workspace(local, features.parent))
        command += f" --vision {name} --vision-pretrained {pretrained}"
    return command


def _open_error(path: Path) -> str:
    try:
        with h5py.File(path, "r") as handle:
            return "not a feature shard" if "identity" not in handle.attrs else "its identity is unreadable"
    except OSError as error:
        return str(error)

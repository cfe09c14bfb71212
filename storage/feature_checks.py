"""Checking a finished feature cache (storage/feature_cache.py) before it is trusted: `ituning features
verify` and the pipeline's last feature step. Each shard is hashed against the sha256 recorded
for it, opened, and read through for NaN/Inf; its ids are compared with the entry point's and the
split's. Reading the whole cache, this is the slow, thorough check: readers never hash."""

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from storage.feature_shards import file_sha256, read_checksum, read_identity, shard_contents


@dataclass
class VerifyReport:
    rows: int  # token rows over all shards
    expected: int  # usable images of the split
    unreadable: dict[str, str]  # found unreadable while encoding: counted, not a failure
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_feature_cache(entry: Path, expected_ids, block_rows: int = 64, checksums: bool = True) -> VerifyReport:
    """Check a finished cache against the split's usable image ids: every shard intact (its sha256
    as recorded; `checksums=False` skips hashing right after a build checked them), complete and
    consistent with the entry point, no NaN/Inf anywhere, ids unique and equal to the expected ones.
    A problem about one file starts with its name."""
    expected, entry = set(expected_ids), Path(entry)
    if not entry.is_file():
        return VerifyReport(0, len(expected), {}, [f"{entry}: no entry point (the cache is not finished)"])
    try:
        manifest = json.loads(entry.read_text())
        identity, listed_shards = manifest["identity"], manifest["shards"]
    except (OSError, ValueError, KeyError) as error:
        return VerifyReport(0, len(expected), {}, [f"{entry.name}: cannot be read ({error})"])
    found, unreadable, problems, notes = [], {}, [], []
    if identity["image_count"] != len(expected):
        problems.append(f"built for {identity['image_count']} images, the split has {len(expected)} usable")
    for index, listed in enumerate(listed_shards):
        path = entry.parent / listed["file"]
        recorded = (listed.get("sha256") or read_checksum(path)) if checksums else None
        if checksums and path.is_file() and recorded is None:
            notes.append(f"{path.name}: no checksum recorded (built by an earlier version); "
                         f"the next `ituning features` run records it")
        ids, bad, shard_problems = _verify_shard(path, identity, index, listed, block_rows, recorded)
        found += ids
        unreadable.update(bad)
        problems += shard_problems
    duplicated = sorted(i for i, n in Counter(found).items() if n > 1)
    missing = sorted(expected - set(found) - set(unreadable))
    extra = sorted(set(found) - expected)
    for what, ids in (("duplicate ids", duplicated), ("usable images without a row", missing),
                      ("rows of images not usable in the split", extra)):
        if ids:
            problems.append(f"{len(ids)} {what}: {ids[:5]}")
    return VerifyReport(len(found), len(expected), unreadable, problems, notes)


def _verify_shard(path: Path, identity: dict, index: int, listed: dict, block_rows: int, recorded: str | None):
    """(ids, unreadable images, problems) of one shard; a shard that cannot be read is one problem,
    and its ids are taken from the entry point so that they are not reported missing as well."""
    if not path.is_file():
        return listed["image_ids"], listed["unreadable"], [f"{path.name}: missing"]
    problems = []
    if recorded is not None and file_sha256(path) != recorded:
        problems.append(f"{path.name}: checksum mismatch: its bytes changed after it was written")
    try:
        problems += _check_shard_contents(path, identity, index, listed, block_rows)
        image_ids, unreadable = shard_contents(path)
    except (OSError, KeyError) as error:
        return listed["image_ids"], listed["unreadable"], [f"{path.name}: cannot be read ({error})"]
    return image_ids, unreadable, problems


def _check_shard_contents(path: Path, identity: dict, index: int, listed: dict, block_rows: int) -> list[str]:
    problems = []
    if read_identity(path) != identity:
        problems.append(f"{path.name}: built from another encoder, image list or settings")
    image_ids, unreadable = shard_contents(path)
    assigned = min(identity["shard_size"], identity["image_count"] - index * identity["shard_size"])
    with h5py.File(path, "r") as handle:
        tokens = handle["tokens"]
        if len(tokens) != len(image_ids) or len(tokens) + len(unreadable) != assigned:
            problems.append(f"{path.name}: {len(tokens)} token rows and {len(image_ids)} ids + "
                            f"{len(unreadable)} unreadable for {assigned} images")
        non_finite = [image_ids[start + row] for start in range(0, min(len(tokens), len(image_ids)), block_rows)
                      for row in np.flatnonzero(~np.isfinite(tokens[start : start + block_rows]).all(axis=(1, 2)))]
    if non_finite:
        problems.append(f"{path.name}: NaN or Inf in {len(non_finite)} row(s): {non_finite[:5]}")
    if image_ids != listed["image_ids"]:
        problems.append(f"{path.name}: its image ids differ from the entry point's list")
    return problems

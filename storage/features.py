"""The feature cache: frozen CLIP-ViT tokens of a split's images, computed once, read many times.

A cache folder holds fixed-size HDF5 shards (see storage/feature_shards.py) and one entry point,
features.json, written only when every shard is finished. It names the shards, their image ids
and the cache identity: encoder name, pretrained tag, a digest of the encoder's weights, image
size, a fingerprint of the image list (storage/image_lists.py) and the storage settings.

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
- Shards are independent: `shards=[k]` (or the command line's --part I/N) builds a subset, so
  several processes or GPUs can fill one cache; whoever finishes last writes the entry point.
"""

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from ituning.backbones import LOCAL_DIR, BackboneSpec, load_vision_encoder
from storage.feature_shards import EncodeSettings, ShardPlan, encode_shards, image_size, read_identity
from storage.image_lists import image_list_fingerprint

ENTRY_NAME = "features.json"
FORMAT_VERSION = 1
# When the precision asked for has no cache, readers take another, most precise first.
COMPUTE_PRECISIONS = ("float32", "bfloat16", "float16")
STORAGE_DTYPES = ("float32", "float16")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSettings:
    shard_size: int = 1024
    encode: EncodeSettings = EncodeSettings()


@dataclass
class BuildReport:
    entry: Path | None  # None until every shard of the cache is finished
    images: int
    encoded_shards: list[int] = field(default_factory=list)
    reused_shards: list[int] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # image_id -> reason, over the whole cache
    discarded_stale: bool = False  # an earlier cache from another encoder or image list was removed


def encoder_slug(spec: BackboneSpec) -> str:
    """A folder name for an encoder: `ViT-B-16-openai`; local folders and weight files keep their
    name plus a short hash of the full path, so two different local encoders never share a folder."""
    name, pretrained = spec.vision_model, spec.vision_pretrained or "random"
    if name.startswith(LOCAL_DIR):
        name = f"local-{Path(name[len(LOCAL_DIR):]).name}-{_short_hash(name)}"
    if "/" in pretrained or "." in pretrained:
        pretrained = f"{Path(pretrained).stem}-{_short_hash(pretrained)}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}-{pretrained}")


def precision_key(encode: EncodeSettings) -> str:
    """The folder name of a precision: the compute precision `encode` resolves to on its device,
    then the storage dtype, e.g. `bfloat16-float16`."""
    encode = resolved_encode(encode)
    return f"{encode.precision}-{encode.dtype}"


def identity_precision_key(identity: dict) -> str:
    return f"{identity['compute_precision']}-{identity['dtype']}"


def encoder_cache_dir(workspace: Path, dataset: str, split: str, spec: BackboneSpec) -> Path:
    """The split's caches of one encoder, one subfolder per precision."""
    return Path(workspace) / "features" / dataset / split / encoder_slug(spec)


def split_cache_dir(workspace: Path, dataset: str, split: str, spec: BackboneSpec, encode: EncodeSettings) -> Path:
    """Where the split's cache for this encoder is built at the precision `encode` resolves to."""
    return encoder_cache_dir(workspace, dataset, split, spec) / precision_key(encode)


def find_feature_entry(workspace: Path, dataset: str, split: str, spec: BackboneSpec, encode: EncodeSettings) -> Path:
    """The entry point to read: the finished cache at `encode`'s precision; else a finished one at
    another precision (the most precise, with a warning); else where the first would be."""
    wanted = split_cache_dir(workspace, dataset, split, spec, encode)
    finished = finished_caches(wanted.parent)
    exact = [entry for entry, key in finished if key == wanted.name]
    if exact or not finished:
        return exact[0] if exact else wanted / ENTRY_NAME
    entry, key = min(finished, key=lambda found: _precision_rank(found[1]))
    log.warning("%s: no feature cache at %s; reading the one at %s", wanted.parent, wanted.name, key)
    return entry


def finished_caches(encoder_dir: Path) -> list[tuple[Path, str]]:
    """(entry point, precision key) of the encoder folder's finished caches: those in precision
    folders, then one an earlier version left in the encoder folder itself."""
    found = []
    for entry in [*sorted(Path(encoder_dir).glob(f"*/{ENTRY_NAME}")), Path(encoder_dir) / ENTRY_NAME]:
        identity = _entry_identity(entry)
        if identity is not None:
            found.append((entry, identity_precision_key(identity)))
    return found


def encoder_weights_digest(encoder) -> str:
    """sha256 over the encoder's tensors: catches a local encoder re-saved under the same name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(dtype=torch.uint8).numpy())
    return digest.hexdigest()


def encoder_layers_digest(encoder) -> str:
    """sha256 over the encoder's layer types in order: the same weights run with another activation
    (QuickGELU, as OpenAI's CLIP was trained, or GELU) give other tokens."""
    return hashlib.sha256(",".join(type(module).__name__ for module in encoder.modules()).encode()).hexdigest()


def cache_identity(encoder, images, settings: FeatureSettings) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "encoder_name": encoder.spec.vision_model,
        "encoder_pretrained": encoder.spec.vision_pretrained or "",
        "encoder_weights_sha256": encoder_weights_digest(encoder),
        "encoder_layers": encoder_layers_digest(encoder),
        "image_size": list(image_size(encoder)),
        "image_list_fingerprint": image_list_fingerprint(images),
        "image_count": len(images),
        "shard_size": settings.shard_size,
        "dtype": settings.encode.dtype,
        "compute_precision": settings.encode.precision,
    }


def extract_features(images, spec: BackboneSpec, out_dir: Path, settings: FeatureSettings = FeatureSettings(),
                     shards: list[int] | None = None, encoder=None) -> BuildReport:
    """Encode the images into the cache at out_dir (only `shards` of it, when given), reusing what
    is already finished for the same encoder and image list."""
    out_dir = Path(out_dir)
    plan = ShardPlan(_sorted_unique(images), settings.shard_size)
    settings = replace(settings, encode=resolved_encode(settings.encode))
    if out_dir.name == precision_key(settings.encode):
        adopt_earlier_cache(out_dir)
    encoder = encoder if encoder is not None else load_vision_encoder(spec, settings.encode.device)
    identity = cache_identity(encoder, plan.images, settings)
    entry = out_dir / ENTRY_NAME
    if entry.is_file() and json.loads(entry.read_text())["identity"] == identity:
        return _report(plan, out_dir, entry, reused=list(range(plan.count)))
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = discard_stale(out_dir, identity)
    wanted = list(range(plan.count)) if shards is None else sorted(set(shards))
    for shard in wanted:
        for temp in out_dir.glob(f"{plan.path(out_dir, shard).name}.tmp-*"):
            temp.unlink(missing_ok=True)  # left by an interrupted run
    missing = [k for k in wanted if not plan.path(out_dir, k).is_file()]
    reused = [k for k in wanted if k not in missing]
    log.info("feature cache %s: %d shard(s) to encode, %d reused", out_dir, len(missing), len(reused))
    encoded = encode_shards(encoder, plan, missing, out_dir, identity, settings.encode)
    done = all(plan.path(out_dir, k).is_file() for k in range(plan.count))
    entry_path = write_entry(out_dir, plan, identity) if done else None
    report = _report(plan, out_dir, entry_path, reused=reused, encoded=encoded)
    report.discarded_stale = stale
    return report


def build_feature_cache(images, spec: BackboneSpec, out_dir: Path, settings: FeatureSettings = FeatureSettings(),
                        encoder=None) -> Path:
    """Build (or reuse, or finish) the whole cache; returns its entry point."""
    return extract_features(images, spec, out_dir, settings, encoder=encoder).entry


def build_shard(shard: int, images, spec: BackboneSpec, out_dir: Path, settings: FeatureSettings = FeatureSettings(),
                encoder=None) -> Path:
    """Build shard `shard` alone: the unit of parallel work."""
    extract_features(images, spec, out_dir, settings, shards=[shard], encoder=encoder)
    return ShardPlan((), settings.shard_size).path(Path(out_dir), shard)


def adopt_earlier_cache(out_dir: Path) -> list[str]:
    """Move the files of out_dir's precision that an earlier version wrote straight into the
    encoder folder (out_dir's parent) into out_dir, the entry point last; returns their names.
    Other precisions' files stay, still readable, until their own precision is built. A file
    another process moved first, or one whose name out_dir already holds, is left alone."""
    moved = []
    for path in [*sorted(out_dir.parent.glob("shard-*.h5")), out_dir.parent / ENTRY_NAME]:
        identity = _entry_identity(path) if path.name == ENTRY_NAME else read_identity(path)
        if identity is None or identity_precision_key(identity) != out_dir.name or (out_dir / path.name).exists():
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


def discard_stale(out_dir: Path, identity: dict) -> bool:
    """Delete the entry point and every finished shard built with a different identity; True if any
    was. Shards of this identity stay, and so do temporary files: shard tasks running side by side
    after a change each rebuild their own shards and must not remove one another's work (a task
    clears its own shards' leftovers before it encodes them)."""
    entry = out_dir / ENTRY_NAME
    stale = [entry] if entry.is_file() and json.loads(entry.read_text())["identity"] != identity else []
    stale += [path for path in sorted(out_dir.glob("shard-*.h5")) if read_identity(path) != identity]
    if stale:
        log.warning("feature cache %s was built from another encoder or image list: rebuilding", out_dir)
        for path in stale:
            path.unlink(missing_ok=True)
    return bool(stale)


def write_entry(out_dir: Path, plan: ShardPlan, identity: dict) -> Path:
    shards = []
    for index in range(plan.count):
        image_ids, unreadable = shard_contents(plan.path(out_dir, index))
        shards.append({"file": plan.path(out_dir, index).name, "image_ids": image_ids, "unreadable": unreadable})
    entry = out_dir / ENTRY_NAME
    temp = entry.with_name(f"{ENTRY_NAME}.tmp-{os.getpid()}")
    temp.write_text(json.dumps({"identity": identity, "shards": shards}))
    os.replace(temp, entry)
    return entry


@dataclass
class VerifyReport:
    rows: int  # token rows over all shards
    expected: int  # usable images of the split
    unreadable: dict[str, str]  # found unreadable while encoding: counted, not a failure
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_feature_cache(entry: Path, expected_ids, block_rows: int = 64) -> VerifyReport:
    """Check a finished cache against the split's usable image ids: every shard complete and
    consistent with the entry point, no NaN/Inf anywhere, ids unique and equal to the expected ones."""
    expected, entry = set(expected_ids), Path(entry)
    if not entry.is_file():
        return VerifyReport(0, len(expected), {}, [f"{entry}: no entry point (the cache is not finished)"])
    manifest = json.loads(entry.read_text())
    identity, found, unreadable, problems = manifest["identity"], [], {}, []
    if identity["image_count"] != len(expected):
        problems.append(f"built for {identity['image_count']} images, the split has {len(expected)} usable")
    for index, listed in enumerate(manifest["shards"]):
        ids, bad, shard_problems = _verify_shard(entry.parent / listed["file"], identity, index, listed, block_rows)
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
    return VerifyReport(len(found), len(expected), unreadable, problems)


def _verify_shard(path: Path, identity: dict, index: int, listed: dict, block_rows: int):
    if not path.is_file():
        return [], {}, [f"{path.name}: missing"]
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
    return image_ids, unreadable, problems


class FeatureReader(Mapping):
    """image_id -> (tokens, width) array, read from the shards on demand.

    Picklable: shard files are opened lazily, once per process, on first use; a copy in a
    DataLoader worker (forked or spawned) opens its own handles. Nothing is read in bulk."""

    def __init__(self, entry: Path):
        self.entry = Path(entry)
        manifest = json.loads(self.entry.read_text())
        self.attrs: dict = manifest["identity"]
        self.shard_files = [self.entry.parent / shard["file"] for shard in manifest["shards"]]
        self.image_ids: list[str] = [i for shard in manifest["shards"] for i in shard["image_ids"]]
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
        return self._tokens(shard)[row]

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


def shard_contents(path: Path) -> tuple[list[str], dict[str, str]]:
    """A finished shard's image ids and its unreadable images (id -> reason)."""
    with h5py.File(path, "r") as handle:
        unreadable = dict(zip(handle["unreadable_ids"].asstr()[:], handle["unreadable_reasons"].asstr()[:]))
        return list(handle["image_ids"].asstr()[:]), unreadable


def _report(plan: ShardPlan, out_dir: Path, entry: Path | None, reused=(), encoded=()) -> BuildReport:
    unreadable = {}
    for index in [*reused, *encoded]:
        unreadable.update(shard_contents(plan.path(out_dir, index))[1])
    return BuildReport(entry, len(plan.images), list(encoded), list(reused), unreadable)


def _sorted_unique(images) -> tuple[tuple[str, Path], ...]:
    ordered = tuple(sorted((str(image_id), Path(path)) for image_id, path in images))
    duplicates = sorted({a for (a, _), (b, _) in zip(ordered, ordered[1:]) if a == b})
    if duplicates:
        raise ValueError(f"duplicate image ids in the image list: {duplicates[:5]}")
    return ordered


def resolved_encode(encode: EncodeSettings) -> EncodeSettings:
    """`auto` precision: bfloat16 autocast where the GPU supports it, float32 otherwise."""
    if encode.precision != "auto":
        return encode
    cuda = encode.device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return replace(encode, precision="bfloat16" if cuda else "float32")


def _entry_identity(entry: Path) -> dict | None:
    try:
        return json.loads(Path(entry).read_text())["identity"]
    except (OSError, ValueError, KeyError):
        return None


def _precision_rank(key: str) -> tuple[int, int]:
    compute, _, dtype = key.partition("-")
    return (COMPUTE_PRECISIONS.index(compute) if compute in COMPUTE_PRECISIONS else len(COMPUTE_PRECISIONS),
            STORAGE_DTYPES.index(dtype) if dtype in STORAGE_DTYPES else len(STORAGE_DTYPES))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]



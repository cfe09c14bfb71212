"""The feature cache, composed: frozen CLIP-ViT tokens of a split's images, computed once, read many times.

The images go through the one encoding path of ituning/encoding.py; the shards are written by
storage/feature_shards.py's writer; which shards to encode, their locks, checksums and the entry
point, and where each precision's cache lives, are storage/feature_cache.py's rules (see there).
This module names the encoder's folder, computes the cache identity (which needs the encoder) and
the precision the device resolves `auto` to, and runs a build. `shards=[k]` (or the command line's
--part I/N) builds a subset, so several processes or GPUs can fill one cache. The step functions
at the bottom are what the tasks and the command line call.
"""

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ituning.backbones import LOCAL_DIR, BackboneSpec, load_vision_encoder
from ituning.captioner import resolve_device
from ituning.encoding import (
    EncodeSettings, encode_batches, encoder_layers_digest, encoder_weights_digest, image_size,
)
from ituning.precision import resolve_precision
from ituning.progress import Progress
from pipeline.data import split_images
from storage.feature_cache import (
    FORMAT_VERSION, BuildReport, adopt_earlier_cache, build_report, clear_for_encoding, damaged_shards,
    discard_stale, find_entry, finish_entry, lock_shards, precision_folder, shards_to_encode, sorted_unique_images,
)
from storage.feature_checks import verify_feature_cache
from storage.feature_shards import ShardBatch, ShardPlan, ShardWriter
from storage.image_lists import image_list_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSettings:
    shard_size: int = 1024
    encode: EncodeSettings = EncodeSettings()


def encoder_slug(spec: BackboneSpec) -> str:
    """A folder name for an encoder: `ViT-B-16-openai`; local folders and weight files keep their
    name plus a short hash of the full path, so two different local encoders never share a folder."""
    name, pretrained = spec.vision_model, spec.vision_pretrained or "random"
    if name.startswith(LOCAL_DIR):
        name = f"local-{Path(name[len(LOCAL_DIR):]).name}-{_short_hash(name)}"
    if "/" in pretrained or "." in pretrained:
        pretrained = f"{Path(pretrained).stem}-{_short_hash(pretrained)}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}-{pretrained}")


def resolved_encode(encode: EncodeSettings) -> EncodeSettings:
    """The settings with `auto` precision resolved for their device (ituning.precision.resolve_precision)."""
    return replace(encode, precision=resolve_precision(encode.device, encode.precision))


def precision_key(encode: EncodeSettings) -> str:
    """The folder name of a precision: the compute precision `encode` resolves to on its device,
    then the storage dtype, e.g. `bfloat16-float16`."""
    encode = resolved_encode(encode)
    return precision_folder(encode.precision, encode.dtype)


def encoder_cache_dir(workspace: Path, dataset: str, split: str, spec: BackboneSpec) -> Path:
    """The split's caches of one encoder, one subfolder per precision; an encoder in the workspace is
    named by its path there, so a copied or moved workspace finds its caches."""
    return Path(workspace) / "features" / dataset / split / encoder_slug(spec.relative_to(workspace))


def split_cache_dir(workspace: Path, dataset: str, split: str, spec: BackboneSpec, encode: EncodeSettings) -> Path:
    """Where the split's cache for this encoder is built at the precision `encode` resolves to."""
    return encoder_cache_dir(workspace, dataset, split, spec) / precision_key(encode)


def find_feature_entry(workspace: Path, dataset: str, split: str, spec: BackboneSpec, encode: EncodeSettings) -> Path:
    """The entry point to read: the finished cache at `encode`'s precision; else a finished one at
    another precision (the most precise, with a warning); else where the first would be."""
    return find_entry(encoder_cache_dir(workspace, dataset, split, spec), precision_key(encode))


def cache_identity(encoder, images, settings: FeatureSettings, workspace: Path | None = None) -> dict:
    """What a cache was built from; the encoder's and the images' paths inside `workspace` relative to it."""
    spec = encoder.spec if workspace is None else encoder.spec.relative_to(workspace)
    return {
        "format_version": FORMAT_VERSION,
        "encoder_name": spec.vision_model,
        "encoder_pretrained": spec.vision_pretrained or "",
        "encoder_weights_sha256": encoder_weights_digest(encoder),
        "encoder_layers": encoder_layers_digest(encoder),
        "image_size": list(image_size(encoder)),
        "image_list_fingerprint": image_list_fingerprint(images, root=workspace),
        "image_count": len(images),
        "shard_size": settings.shard_size,
        "dtype": settings.encode.dtype,
        "compute_precision": settings.encode.precision,
    }


def encode_features(images, spec: BackboneSpec, out_dir: Path, settings: FeatureSettings = FeatureSettings(),
                    shards: list[int] | None = None, encoder=None, workspace: Path | None = None) -> BuildReport:
    """Encode the images into the cache at out_dir (only `shards` of it, when given), reusing what
    is already finished, intact, for the same encoder and image list. CacheBusy when another
    process is encoding one of the shards to encode. The identity names paths inside `workspace`
    relative to it."""
    out_dir = Path(out_dir)
    plan = ShardPlan(sorted_unique_images(images), settings.shard_size)
    settings = replace(settings, encode=resolved_encode(settings.encode))
    if out_dir.name == precision_key(settings.encode):
        adopt_earlier_cache(out_dir)
    encoder = encoder if encoder is not None else load_vision_encoder(spec, settings.encode.device)
    identity = cache_identity(encoder, plan.images, settings, workspace)
    wanted = list(range(plan.count)) if shards is None else sorted(set(shards))
    out_dir.mkdir(parents=True, exist_ok=True)
    stale, damaged = discard_stale(out_dir, identity)
    damaged.update(damaged_shards(out_dir, plan, wanted))
    todo = shards_to_encode(out_dir, plan, wanted, damaged)
    with lock_shards(out_dir, plan, todo):
        missing = clear_for_encoding(out_dir, plan, todo, damaged)
        log.info("feature cache %s: %d shard(s) to encode, %d reused", out_dir, len(missing),
                 len(wanted) - len(missing))
        encoded = encode_shards(encoder, plan, missing, out_dir, identity, settings.encode)
    reused = [k for k in wanted if k not in missing]
    report = build_report(plan, out_dir, finish_entry(out_dir, plan, identity), reused=reused, encoded=encoded)
    report.discarded_stale, report.damaged = stale, damaged
    return report


def encode_shards(encoder, plan: ShardPlan, shards: list[int], out_dir: Path, identity: dict,
                  settings: EncodeSettings) -> list[int]:
    """Encode and write the given shards (each complete, or not at all); returns those finished."""
    items = [(shard, image_id, path) for shard in shards for image_id, path in plan.items(shard)]
    if not items:
        return []
    batches = encode_batches(encoder, items, settings)
    writer = ShardWriter(out_dir, plan, identity, settings.dtype, settings.queue_batches)
    writer.start()
    try:
        with Progress(len(items), f"encoding {progress_label(out_dir, shards)}", "images") as progress:
            for batch in batches:
                writer.submit(ShardBatch(batch.group, batch.image_ids, batch.errors, batch.tokens, batch.ready))
                progress.update(len(batch.image_ids))
    except BaseException:
        writer.abandon()
        raise
    return writer.close()


def progress_label(out_dir: Path, shards: list[int]) -> str:
    """`coco/train shard 3` (or `shards 0-7`) from a cache folder .../features/<dataset>/<split>/<encoder>/<precision>."""
    where = "/".join(Path(out_dir).parts[-4:-2])
    return f"{where} shard {shards[0]}" if len(shards) == 1 else f"{where} shards {shards[0]}-{shards[-1]}"


def build_feature_cache(images, spec: BackboneSpec, out_dir: Path, settings: FeatureSettings = FeatureSettings(),
                        encoder=None, workspace: Path | None = None) -> Path:
    """Build (or reuse, or finish) the whole cache; returns its entry point."""
    return encode_features(images, spec, out_dir, settings, encoder=encoder, workspace=workspace).entry


def build_shard(shard: int, images, spec: BackboneSpec, out_dir: Path, settings: FeatureSettings = FeatureSettings(),
                encoder=None, workspace: Path | None = None) -> Path:
    """Build shard `shard` alone: the unit of parallel work."""
    encode_features(images, spec, out_dir, settings, shards=[shard], encoder=encoder, workspace=workspace)
    return ShardPlan((), settings.shard_size).path(Path(out_dir), shard)


def workspace_spec(workspace: Path, backbones: dict) -> BackboneSpec:
    """The backbones to load: those named relative to the workspace taken from it."""
    return BackboneSpec(**backbones).located(workspace)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _feature_settings(shard_size: int, device: str) -> FeatureSettings:
    return FeatureSettings(shard_size, EncodeSettings(device=resolve_device(device)))


def feature_entry(workspace: Path, dataset: str, split: str, backbones: dict, device: str = "auto") -> Path:
    """The entry point of the split's feature cache for these backbones: the one of `device`'s
    precision, else a finished one of another precision (find_feature_entry)."""
    encode = _feature_settings(1024, device).encode  # the shard size plays no part in where a cache lives
    return find_feature_entry(Path(workspace), dataset, split, BackboneSpec(**backbones), encode)


def feature_dir(workspace: Path, dataset: str, split: str, backbones: dict, settings: FeatureSettings) -> Path:
    """Where the split's feature cache is built at the precision of `settings`."""
    return split_cache_dir(Path(workspace), dataset, split, BackboneSpec(**backbones), settings.encode)


def feature_shards(workspace: Path, dataset: str, split: str, shard_size: int = 1024) -> list[int]:
    """The shard indices of the split's cache."""
    return list(range(ShardPlan(tuple(split_images(workspace, dataset, split)), shard_size).count))


def cache_feature_shard(workspace: Path, dataset: str, split: str, backbones: dict, shard: int,
                        shard_size: int = 1024, device: str = "auto") -> str:
    """Encode one shard of the split's cache (reused when already finished); returns its file."""
    settings = _feature_settings(shard_size, device)
    out_dir = feature_dir(workspace, dataset, split, backbones, settings)
    return str(build_shard(shard, split_images(workspace, dataset, split), workspace_spec(workspace, backbones),
                           out_dir, settings, workspace=Path(workspace)))


def finish_feature_cache(workspace: Path, dataset: str, split: str, backbones: dict, shard_size: int = 1024,
                         device: str = "auto") -> str:
    """Write the entry point once every shard exists (encoding any still missing) and verify the
    cache against the catalog; returns the features.json path. `device` must be the one the
    shards were encoded on: it decides the compute precision, which is part of the cache identity."""
    return completed_feature_cache(workspace, dataset, split, backbones, shard_size, device)["entry"]


def completed_feature_cache(workspace: Path, dataset: str, split: str, backbones: dict, shard_size: int = 1024,
                            device: str = "auto") -> dict:
    """finish_feature_cache's work, told as {"entry": features.json path, "encoded_shards": the shards
    it had to encode (missing, or damaged since they were written)}."""
    images = split_images(workspace, dataset, split)
    settings = _feature_settings(shard_size, device)
    out_dir = feature_dir(workspace, dataset, split, backbones, settings)
    built = encode_features(images, workspace_spec(workspace, backbones), out_dir, settings, workspace=Path(workspace))
    report = verify_feature_cache(built.entry, [image_id for image_id, _ in images])
    if not report.ok:
        raise RuntimeError(f"{built.entry}: " + "; ".join(report.problems))
    return {"entry": str(built.entry), "encoded_shards": built.encoded_shards}

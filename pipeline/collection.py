"""Captioning a whole collection: a folder, a list of paths or URLs, or WebDataset tars, shard by shard.

`plan_collection` lists the source (storage/collection_sources.py), loads the model once to know its
weights, and claims the output folder for this source and these settings (pipeline/collection_output.py).
`caption_shard` captions one shard into one Parquet file; it reuses a shard already written with the
same settings, so a rerun after a crash redoes only the shards that were in flight. Each shard:

1. stages its images as local files: paths as they are, URLs fetched (pipeline/collection_fetch.py:
   public hosts only, a limit per host, retries), a tar's image members written out;
2. reads every header: size, EXIF orientation, the pixel limit (ituning/images.py) decide
   `too-large` before anything is decoded;
3. decodes and encodes in batches on worker processes (ituning/encoding.py:encode_batches);
4. decodes captions in batches with every finished beam and its score (ituning/decoding.py), the fast
   decoding paths where they are on; with a CLIP, scores each beam with CLIP-S (ituning/clip_score.py)
   and, with rerank "clip", keeps the beam with the highest (LAION-COCO's recipe).

The captioner and the CLIP are loaded once per process and kept for the next shard.
"""

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ituning.decoding import DecodingConfig, greedy_search, ranked_beams
from ituning.encoding import EncodeSettings, encode_batches, encoder_weights_digest
from ituning.images import within_pixel_limit
from pipeline.collection_fetch import FetchSettings, fetch_all, fetch_tar
from pipeline.collection_output import (
    MANIFEST, SUMMARY, Row, claim_output, finished_shard, remove_temporary_files, summarize, write_shard,
)
from storage.collection_sources import Shard, is_url, list_collection, tar_samples

RERANKS = ("none", "clip")
ORIENTATION_TAG = 0x0112
SIDEWAYS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class CollectionSettings:
    model: str
    num_beams: int = 5
    max_length: int = 20
    min_length: int = 0
    length_penalty: float = 1.0
    rerank: str = "none"  # "clip": keep the beam with the highest CLIP-S
    clip_model: str | None = None  # a CLIP named like a vision backbone; CLIP-S per image when set
    clip_pretrained: str | None = None
    shard_size: int = 1000  # images per shard of a folder or a list (a tar is one shard)
    batch_size: int = 32
    decode_workers: int = 2  # processes decoding images
    device: str = "auto"
    workspace: str | None = None  # whose tracking store a registry model and the run are in
    max_image_bytes: int = 20 * 1024 * 1024
    per_host: int = 4
    allow_private_urls: bool = False

    def __post_init__(self):
        if self.rerank not in RERANKS:
            raise ValueError(f"rerank {self.rerank!r}: one of {', '.join(RERANKS)}")
        if self.rerank == "clip" and not self.clip_model:
            raise ValueError("rerank clip needs a CLIP: give --clip MODEL (e.g. ViT-B-32 --clip-pretrained openai)")
        if self.rerank == "clip" and self.num_beams < 2:
            raise ValueError("rerank clip picks among beams: give --beams 2 or more")
        self.decoding()

    def decoding(self) -> DecodingConfig:
        return DecodingConfig(self.num_beams, self.max_length, self.min_length, self.length_penalty)

    def fetch(self) -> FetchSettings:
        return FetchSettings(self.max_image_bytes, self.per_host, allow_private=self.allow_private_urls)

    def output_settings(self) -> dict:
        """What the captions depend on besides the model's weights."""
        return {"decoding": {"num_beams": self.num_beams, "max_length": self.max_length,
                             "min_length": self.min_length, "length_penalty": self.length_penalty},
                "rerank": self.rerank, "clip": [self.clip_model, self.clip_pretrained] if self.clip_model else None,
                "max_image_bytes": self.max_image_bytes}


# ---- the plan ------------------------------------------------------------------------------------


def plan_collection(source: str, out: str | Path, settings: CollectionSettings) -> dict:
    """List the source, claim `out` for it (CollectionMismatch when it holds other work) and say what
    each shard task needs: {"out", "source", "model", "digest", "shards": [Shard, ...]}."""
    collection = list_collection(source, settings.shard_size)
    model_digest = weights_digest(loaded_captioner(settings.model, settings.workspace, settings.device))
    settings_text = json.dumps({"model": model_digest, **settings.output_settings()}, sort_keys=True)
    digest = hashlib.sha256(settings_text.encode()).hexdigest()
    model = f"{settings.model} (weights {model_digest[:12]})"
    claim_output(Path(out), {"source": source, "kind": collection.kind, "fingerprint": collection.fingerprint(),
                             "shards": len(collection.shards), "images": collection.listed_images,
                             "shard_size": settings.shard_size, "model": model, "settings_digest": digest,
                             "settings": settings.output_settings()})
    remove_temporary_files(Path(out))
    return {"out": str(out), "source": source, "model": model, "digest": digest, "shards": list(collection.shards)}


def weights_digest(captioner) -> str:
    """sha256 over every weight the captions depend on (the modules, the language model and the vision
    encoder): the model's identity whichever name (folder, registry alias, hub) it was loaded by, and
    another one when a backbone folder was saved again with other weights."""
    digest = hashlib.sha256(encoder_weights_digest(captioner.vision).encode())
    for name, parameter in sorted(captioner.model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@lru_cache(maxsize=2)
def loaded_captioner(model: str, workspace: str | None, device: str):
    from pipeline.model_sources import load_captioner_from

    captioner = load_captioner_from(model, Path(workspace) if workspace else None, device)
    captioner.model.eval()
    return captioner


@lru_cache(maxsize=2)
def loaded_clip(model: str, pretrained: str | None, device: str):
    from ituning.captioner import resolve_device
    from ituning.clip_score import load_clip_scorer

    return load_clip_scorer(model, pretrained, resolve_device(device))


# ---- one shard -----------------------------------------------------------------------------------


def caption_shard(shard: Shard, plan: dict, settings: CollectionSettings, progress=None) -> dict:
    """The shard's Parquet file, written unless one with these settings is there already:
    {"shard", "images", "reused", "statuses": {status: count}}. `progress` (ituning.progress.Progress)
    hears of every batch captioned."""
    out = Path(plan["out"])
    rows = finished_shard(out, shard.name, plan["digest"])
    if rows is not None:
        return {"shard": shard.name, "images": rows, "reused": True, "statuses": {}}
    with tempfile.TemporaryDirectory(prefix=f"ituning-{shard.name}-") as folder:
        rows, files = staged_rows(shard, Path(folder), settings.fetch())
        caption_rows(rows, files, settings, progress)
        if progress is not None:
            progress.update(len(rows) - len(files))  # those refused before decoding
    write_shard(out, shard.name, rows, plan["model"], plan["digest"])
    statuses = {}
    for row in rows:
        statuses[row.status] = statuses.get(row.status, 0) + 1
    return {"shard": shard.name, "images": len(rows), "reused": False, "statuses": statuses}


def staged_rows(shard: Shard, folder: Path, fetch: FetchSettings) -> tuple[list[Row], dict[int, Path]]:
    """A row per image (failed ones with their status already) and {row index: local file} of the rest."""
    if shard.tar is not None:
        return _staged_tar(shard.tar, folder, fetch)
    rows = [Row(item.key, item.source, given_caption=item.given_caption) for item in shard.items]
    urls = {index: item.source for index, item in enumerate(shard.items) if is_url(item.source)}
    fetched = fetch_all(urls, folder, fetch) if urls else {}
    files = {}
    for index, item in enumerate(shard.items):
        if index in fetched and fetched[index].error is not None:
            error = fetched[index].error
            _fail(rows[index], "too-large" if error.reason == "too large" else "fetch-failed", str(error))
        elif index in fetched:
            files[index] = fetched[index].path
        elif not item.source or not Path(item.source).is_file():
            _fail(rows[index], "missing", "no such file")
        else:
            files[index] = Path(item.source)
    return rows, _with_headers(rows, files)


def _staged_tar(tar: str, folder: Path, fetch: FetchSettings) -> tuple[list[Row], dict[int, Path]]:
    local = fetch_tar(tar, folder / "shard.tar", fetch) if is_url(tar) else Path(tar)
    rows, files = [], {}
    with open(local, "rb") as file:
        for index, sample in enumerate(tar_samples(file, fetch.max_bytes)):
            row = Row(sample.key, f"{tar}#{sample.member}", given_caption=sample.given_caption)
            rows.append(row)
            if sample.too_large:
                _fail(row, "too-large", f"over the {fetch.max_bytes:,}-byte limit")
            elif sample.image is None:
                _fail(row, "missing", "the sample has no image member")
            else:
                files[index] = folder / f"member-{index:06d}"
                files[index].write_bytes(sample.image)
    return rows, _with_headers(rows, files)


def _fail(row: Row, status: str, reason: str) -> None:
    row.status, row.reason = status, reason.removeprefix(f"{row.source}: ")


def _with_headers(rows: list[Row], files: dict[int, Path]) -> dict[int, Path]:
    """The files whose header gives a size within the pixel limit; the others' rows fail with the reason."""
    usable = {}
    for index, path in files.items():
        row = rows[index]
        try:
            with Image.open(path) as image:
                width, height = image.size
                sideways = image.getexif().get(ORIENTATION_TAG) in SIDEWAYS
        except UnidentifiedImageError:
            _fail(row, "unreadable", "not an image file")
            continue
        except Image.DecompressionBombError as error:
            _fail(row, "too-large", f"too large to decode ({error})")
            continue
        except (OSError, SyntaxError, ValueError) as error:
            _fail(row, "unreadable", f"cannot read the header ({error})")
            continue
        row.width, row.height = (height, width) if sideways else (width, height)
        if not within_pixel_limit(width * height):
            _fail(row, "too-large", f"{width * height:,} pixels, over the limit of {Image.MAX_IMAGE_PIXELS:,} "
                                    "(PIL.Image.MAX_IMAGE_PIXELS)")
            continue
        usable[index] = path
    return usable


# ---- captions ------------------------------------------------------------------------------------


def caption_rows(rows: list[Row], files: dict[int, Path], settings: CollectionSettings, progress=None) -> None:
    """Captions (and beams, CLIP-S) into the rows of `files`, decoded and encoded a batch at a time."""
    if not files:
        return
    captioner = loaded_captioner(settings.model, settings.workspace, settings.device)
    clip = loaded_clip(settings.clip_model, settings.clip_pretrained, settings.device) if settings.clip_model else None
    encode = EncodeSettings(batch_size=settings.batch_size, num_workers=settings.decode_workers,
                            device=str(captioner.device), dtype="float32")
    items = [(0, str(index), str(path)) for index, path in files.items()]
    for batch in encode_batches(captioner.vision, items, encode):
        tokens = torch.from_numpy(batch.host_tokens())  # (B, 1 + P, width)
        decoded = []
        for position, (index, error) in enumerate(zip(map(int, batch.image_ids), batch.errors)):
            if error:
                _fail(rows[index], "too-large" if "too large" in error else "unreadable", error)
            else:
                decoded.append((position, index))
        if decoded:
            beams = decoded_beams(captioner, tokens[[position for position, _ in decoded]], settings.decoding())
            indices = [index for _, index in decoded]
            _fill(rows, indices, beams, clip and _clip_scores(clip, [files[i] for i in indices], beams), settings)
        if progress is not None:
            progress.update(len(batch.image_ids))


def decoded_beams(captioner, visual: torch.Tensor, decoding: DecodingConfig) -> list[list[tuple[str, float | None]]]:
    """(caption, score) of every finished beam of each image, best first; greedy decoding gives one, unscored."""
    parameter = next(captioner.model.parameters())
    visual = visual.to(parameter.device, dtype=parameter.dtype)
    prompt, text = captioner.prompt_ids(), captioner.tokenizer.decode
    if decoding.num_beams == 1:
        found = greedy_search(captioner.model, visual, prompt, captioner.eos_id, decoding)
        return [[(text(tokens, skip_special_tokens=True).strip(), None)] for tokens in found]
    found = ranked_beams(captioner.model, visual, prompt, captioner.eos_id, decoding)
    return [[(text(beam.tokens, skip_special_tokens=True).strip(), beam.score) for beam in image] for image in found]


def _clip_scores(clip, paths: list[Path], beams: list[list[tuple]]) -> list[list[float]]:
    """CLIP-S of every beam of each image."""
    from ituning.clip_score import clip_s

    images = clip.embed_images([str(path) for path in paths])  # (B, D)
    texts = [caption for image in beams for caption, _ in image]
    scores = clip_s(images.repeat_interleave(torch.tensor([len(image) for image in beams]), dim=0),
                    clip.embed_texts(texts), clip.w).tolist()
    per_image, start = [], 0
    for image in beams:
        per_image.append(scores[start:start + len(image)])
        start += len(image)
    return per_image


def _fill(rows: list[Row], indices: list[int], beams: list[list[tuple]], clip_scores, settings) -> None:
    for position, index in enumerate(indices):
        scores = clip_scores[position] if clip_scores else [None] * len(beams[position])
        chosen = max(range(len(scores)), key=scores.__getitem__) if settings.rerank == "clip" else 0
        row = rows[index]
        row.beams = [{"caption": text, "score": score, "clip_s": clip_s}
                     for (text, score), clip_s in zip(beams[position], scores)]
        row.caption, row.score = beams[position][chosen]
        row.clip_s = scores[chosen]


# ---- a whole collection --------------------------------------------------------------------------


def caption_collection(source: str, out: str | Path, settings: CollectionSettings) -> dict:
    """Every shard in this process, one after another (the flow flows/caption_collection.py runs them
    as Prefect tasks, on Dask too); the summary, with the MLflow run's id. One writer per output folder."""
    from ituning.progress import Progress
    from pipeline.step_locks import folder_writer

    started = time.monotonic()
    with folder_writer(Path(out), "captioning a collection"):
        plan = plan_collection(source, out, settings)
        results = []
        images = sum(len(shard.items) for shard in plan["shards"]) if plan["shards"][:1] and \
            plan["shards"][0].tar is None else None  # a tar's images are known once it is read
        with Progress(images, f"captioning {source}", "images") as progress:
            for shard in plan["shards"]:
                results.append(caption_shard(shard, plan, settings, progress))
                if results[-1]["reused"]:
                    progress.update(results[-1]["images"])
        return finish_collection(plan, results, time.monotonic() - started, settings)


def finish_collection(plan: dict, results: list[dict], seconds: float, settings: CollectionSettings) -> dict:
    """OUT/summary.json over every shard, with this run's speed; an MLflow run with the counts and the
    summary and manifest as artifacts. The summary, with "mlflow_run_id"."""
    written = [result for result in results if not result["reused"]]
    images = sum(result["images"] for result in written)
    run = {"images": images, "seconds": round(seconds, 3),
           "images_per_s": round(images / seconds, 2) if seconds else None, "shards_written": len(written), "shards_reused": len(results) - len(written)}
    summary = summarize(Path(plan["out"]), run)
    return {**summary, "mlflow_run_id": record_run(plan, summary, settings)}


def record_run(plan: dict, summary: dict, settings: CollectionSettings) -> str:
    from pipeline.tracking import ExperimentTracker

    tracker = ExperimentTracker(workspace=settings.workspace)
    config = {"source": plan["source"], "out": plan["out"], "model": plan["model"], "settings_digest": plan["digest"],
              "settings": asdict(settings)}
    run_id = tracker.start_pipeline("caption-collection", config)
    tracker.set_tag(run_id, "ituning.step", "caption-collection")
    metrics = {f"images_{status}": count for status, count in summary["statuses"].items()}
    metrics.update(images=summary["images"], shards=summary["shards"], run_images=summary["run"]["images"],
                   images_per_s=summary["run"]["images_per_s"], clip_s_mean=summary["clip_s"]["mean"])
    tracker.log_metrics(run_id, {key: value for key, value in metrics.items() if value is not None})
    for name in (SUMMARY, MANIFEST):
        tracker.log_artifact(run_id, Path(plan["out"]) / name, "collection")
    tracker.finish(run_id)
    return run_id

"""Building the COCO catalog from a Karpathy JSON of COCO's real size.

    .venv/bin/python benchmarks/catalog_build.py [--images 123287] [--captions 616767] [--keep DIR] [--check-sample 400]

Writes a dataset_coco.json with the real split sizes (train 82,783, restval 30,504, val 5,000,
test 5,000) and scene captions, then times `build_dataset` on it. No images exist, so the build
runs with check_images=False: every row is catalogued with status "unchecked" and its expected path
(checking files is a separate, I/O-bound cost that grows with the image count). Times the JSON
generation apart; only the build is the benchmark.

To size the file check that a real build adds, it also times `inspect_images` (full decode, 2
processes) on a sample of COCO-sized JPEGs (640x480) and projects that rate onto 123,287 images.

Last, it times the fingerprints the pipeline's cache keys read of the train split (113,287 images,
566,767 captions), after marking every row usable (they are "unchecked" without image files).
"""

import argparse
import json
import platform
import random
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

from storage.catalog import Catalog
from pipeline.data import build_dataset
from pipeline.image_check import inspect_images
from storage.scenes import describe, random_scene, render_scene

SPLITS = (("train", 82_783), ("restval", 30_504), ("val", 5_000), ("test", 5_000))


def karpathy_json(images: int, captions: int, seed: int = 0) -> dict:
    rng, entries, sentence = random.Random(seed), [], 0
    scale = images / sum(count for _, count in SPLITS)
    plan = [split for split, count in SPLITS for _ in range(round(count * scale))][:images]
    extra = captions - 5 * len(plan)  # COCO has a few images with more than five captions
    for number, split in enumerate(plan):
        folder = "train2014" if split == "train" else "val2014"
        cocoid = 1 + number
        texts = describe(random_scene(rng), rng, 5 + (1 if number < extra else 0))
        sentences = [{"tokens": text.split(), "raw": text, "imgid": number, "sentid": sentence + k}
                     for k, text in enumerate(texts)]
        sentence += len(texts)
        entries.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences],
                        "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "imgid": number, "split": split,
                        "sentences": sentences, "cocoid": cocoid})
    return {"dataset": "coco", "images": entries}


def check_rate(folder: Path, sample: int, workers: int = 2) -> float:
    """Images per second that inspect_images decodes, on `sample` 640x480 JPEGs."""
    rng = random.Random(1)
    paths = []
    for number in range(sample):
        path = folder / f"{number}.jpg"
        render_scene(random_scene(rng), 480).resize((640, 480)).save(path, quality=90)
        paths.append(path)
    start = time.perf_counter()
    statuses = inspect_images(paths, workers)
    assert all(status == "ok" for status, *_ in statuses)
    return sample / (time.perf_counter() - start)


def fingerprint_seconds(path: Path, runs: int = 3) -> dict[str, list[float]]:
    """Seconds per call of the train split's image-list and image-and-caption fingerprints."""
    with Catalog(path) as catalog:
        catalog.connection.execute("UPDATE images SET status = 'ok'")
    timings = {}
    with Catalog(path, read_only=True) as catalog:
        for name in ("image_list_fingerprint", "split_fingerprint"):
            timings[name] = []
            for _ in range(runs):
                start = time.perf_counter()
                getattr(catalog, name)("coco", "train")
                timings[name].append(round(time.perf_counter() - start, 3))
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=123_287)
    parser.add_argument("--captions", type=int, default=616_767)
    parser.add_argument("--keep", type=Path, help="workspace folder to keep (default: a temporary one)")
    parser.add_argument("--check-sample", type=int, default=400, help="JPEGs to time the file check on (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        annotations = root / "data" / "coco" / "dataset_coco.json"
        annotations.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        annotations.write_text(json.dumps(karpathy_json(args.images, args.captions)))
        generated = time.perf_counter() - start
        start = time.perf_counter()
        with Catalog(root / "catalog.duckdb") as catalog:
            summary = build_dataset(root, "coco", catalog, check_images=False)
        built = time.perf_counter() - start
        with Catalog(root / "catalog.duckdb", read_only=True) as catalog:
            _, rows = catalog.query("SELECT i.split, count(DISTINCT i.image_id), count(*) FROM images i "
                                    "JOIN captions c USING (dataset, split, image_id) GROUP BY ALL ORDER BY ALL")
        (root / "sample").mkdir()
        rate = check_rate(root / "sample", args.check_sample) if args.check_sample else None
        fingerprints = fingerprint_seconds(root / "catalog.duckdb")
        print(json.dumps({
            "images": summary.images, "captions": summary.captions,
            "images_and_captions_by_split": {split: [n, m] for split, n, m in rows},
            "json_mib": round(annotations.stat().st_size / 2**20, 1), "generate_s": round(generated, 1),
            "build_s": round(built, 2),
            "check_images_per_s": rate and round(rate), "projected_check_s": rate and round(summary.images / rate),
            "train_fingerprint_s": fingerprints,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "machine": f"{platform.machine()}, {date.today().isoformat()}"}, indent=1))


if __name__ == "__main__":
    main()

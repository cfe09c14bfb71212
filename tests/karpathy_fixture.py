"""A minimal synthetic corpus in the Karpathy split format, rendered from storage.scenes."""

import json
import random
from pathlib import Path

from storage.scenes import describe, random_scene, render_scene


def write_karpathy_corpus(root: Path, splits: dict[str, int], seed: int = 0, size: int = 96) -> Path:
    """Images under root/images and root/dataset_coco.json; returns the JSON path."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for split, count in splits.items():
        for _ in range(count):
            scene = random_scene(rng)
            image_id = len(entries)
            filename = f"synthetic_{image_id:06d}.png"
            render_scene(scene, size).save(root / "images" / filename)
            sentences = [{"raw": text, "tokens": text.split()} for text in describe(scene, rng)]
            entries.append({"filepath": "images", "filename": filename, "split": split, "cocoid": image_id,
                            "imgid": image_id, "sentences": sentences})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "synthetic", "images": entries}))
    return path

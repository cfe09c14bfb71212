"""Images/s end to end: `ituning caption-collection` against `ituning caption` over the same images.

    python benchmarks/caption_collection.py --checkpoint workspace/runs/demo/finetune/best --images 400
    python benchmarks/caption_collection.py --checkpoint CKPT --images 20000 --device cuda --batch-size 256

Both commands run as a user runs them, in a subprocess, timed from start to exit (model loading and
JPEG decoding included), on a folder of synthetic scene JPEGs (storage/scenes.py) of --side pixels.
`ituning caption` is given the images in lists of --list-size files, one process per list, the way
a shell loop over a photo archive calls it; --list-size 0 gives it every image in one call.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from storage.scenes import random_scene, render_scene  # noqa: E402

BIN = Path(sys.executable).parent


def write_images(folder: Path, count: int, side: int) -> list[Path]:
    rng = random.Random(0)
    paths = []
    for number in range(count):
        path = folder / f"{number:06d}.jpg"
        render_scene(random_scene(rng), side).save(path, quality=90)
        paths.append(path)
    return paths


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def caption_lists(paths: list[Path], checkpoint: str, options: list[str], list_size: int) -> float:
    size = list_size or len(paths)
    return sum(timed([str(BIN / "ituning"), "caption", "--checkpoint", checkpoint, *options,
                      *map(str, paths[start:start + size])]) for start in range(0, len(paths), size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--list-size", type=int, default=100, help="images per `ituning caption` call; 0: all")
    parser.add_argument("--skip-caption", action="store_true", help="time caption-collection only")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ituning-bench-") as folder:
        (Path(folder) / "images").mkdir()
        paths = write_images(Path(folder) / "images", arguments.images, arguments.side)
        common = ["--beams", str(arguments.beams), "--device", arguments.device,
                  "--batch-size", str(arguments.batch_size)]
        collection = timed([str(BIN / "ituning"), "caption-collection", str(Path(folder) / "images"), "--model",
                            arguments.checkpoint, "--out", str(Path(folder) / "out"), "--workspace",
                            str(Path(folder) / "ws"), "--workers", str(arguments.workers), "--shard-size",
                            str(arguments.shard_size), *common])
        summary = json.loads((Path(folder) / "out" / "summary.json").read_text())
        caption = None if arguments.skip_caption else caption_lists(paths, arguments.checkpoint, common,
                                                                    arguments.list_size)
    result = {"machine": machine(), "images": arguments.images, "side": arguments.side, "beams": arguments.beams,
              "device": arguments.device, "batch_size": arguments.batch_size, "workers": arguments.workers,
              "list_size": arguments.list_size, "caption_collection_s": round(collection, 2),
              "caption_collection_images_per_s": round(arguments.images / collection, 2),
              "captioning_only_images_per_s": summary["run"]["images_per_s"],
              "caption_s": None if caption is None else round(caption, 2),
              "caption_images_per_s": None if caption is None else round(arguments.images / caption, 2),
              "speedup": None if caption is None else round(caption / collection, 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

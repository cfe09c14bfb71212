"""What `--rerank clip` does to CIDEr and CLIP-S, against plain beam search, on a split of a workspace.

    ituning pipeline --synthetic-images 200 --device cpu --workspace ws     # a demo run to measure on
    python benchmarks/collection_rerank.py --workspace ws --checkpoint ws/runs/demo/finetune/best

The split's images are captioned once by `caption_collection` with a CLIP and --rerank clip (beam 5):
each row keeps every finished beam with its log-probability score and its CLIP-S, so plain beam
search's caption (the first beam) and the reranked one (the highest CLIP-S) come from the same beams.
CIDEr is the COCO scorer's (ituning/evaluation.py, Java's PTB tokenizer); CLIP-S is scored by the same
CLIP that reranks, so the reranked CLIP-S is optimistic by construction: CIDEr is the independent check.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--dataset", default="coco")
    parser.add_argument("--split", default="test")
    parser.add_argument("--clip", default=None,
                        help="default: the workspace's stand-in CLIP, local-dir:WS/backbones/vision")
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    arguments = parser.parse_args()

    from ituning.evaluation import score_captions
    from pipeline.collection import CollectionSettings, caption_collection
    from pipeline.data import open_catalog, split_images

    images = dict(split_images(arguments.workspace, arguments.dataset, arguments.split))
    with open_catalog(arguments.workspace) as catalog:
        references = catalog.captions(arguments.dataset, arguments.split)
    clip = arguments.clip or f"local-dir:{(arguments.workspace / 'backbones' / 'vision').resolve()}"
    settings = CollectionSettings(arguments.checkpoint, num_beams=arguments.beams, rerank="clip", clip_model=clip,
                                  device=arguments.device, workspace=str(arguments.workspace), decode_workers=0)
    with tempfile.TemporaryDirectory(prefix="ituning-rerank-") as folder:
        listed = Path(folder) / "images.csv"
        listed.write_text("key,path\n" + "".join(f"{key},{path}\n" for key, path in images.items()))
        caption_collection(str(listed), Path(folder) / "out", settings)
        rows = _rows(Path(folder) / "out")
    plain = {row["key"]: row["beams"][0]["caption"] for row in rows}
    reranked = {row["key"]: row["caption"] for row in rows}
    result = {"machine": machine(), "split": f"{arguments.dataset}/{arguments.split}", "images": len(rows),
              "beams": arguments.beams, "clip": clip, "changed": sum(plain[key] != reranked[key] for key in plain)}
    for name, captions, clip_s in (("beam search", plain, [row["beams"][0]["clip_s"] for row in rows]),
                                   ("--rerank clip", reranked, [row["clip_s"] for row in rows])):
        scores = score_captions(captions, {key: references[key] for key in captions}, ["CIDEr"])
        result[name] = {"CIDEr": round(scores["CIDEr"], 4), "CLIP-S": round(sum(clip_s) / len(clip_s), 4)}
    print(json.dumps(result, indent=2))


def _rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = [row for path in sorted(out.glob("shard-*.parquet")) for row in pq.read_table(path).to_pylist()]
    unusable = [row["key"] for row in rows if row["status"] != "ok"]
    if unusable:
        raise SystemExit(f"{len(unusable)} images could not be captioned, e.g. {unusable[:3]}")
    return rows


if __name__ == "__main__":
    main()

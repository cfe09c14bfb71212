"""Visual Genome v1.2 region descriptions: the image-text pre-training data (VLP) of the paper.

Downloads (built in; sizes as published, no hashes):
| file | URL | bytes |
|---|---|---|
| images.zip | https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip | 9,731,705,982 |
| images2.zip | https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip | 5,471,658,058 |
| image_data.json.zip | https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/image_data.json.zip | 1,780,854 |
| region_descriptions.json.zip | .../region_descriptions.json.zip | 127,377,968 |
One split, pretrain; images lie at VG_100K/ and VG_100K_2/ (the last two segments of their URL).
Images whose coco_id is in COCO Karpathy val or test are left out (test leakage), so COCO is
catalogued first.
"""

import json

from storage.datasets import AnnotationFiles, Dataset, MissingInput
from storage.manifests import Manifest, RemoteFile
from storage.sources import SourceRecords, read_visual_genome
from storage.synthetic import SyntheticCorpus, SyntheticPart, SyntheticWriter, image_payload, zip_files

HELD_OUT_SPLITS = ("val", "test")  # COCO Karpathy splits whose images VG pre-training must not see


def manifest() -> Manifest:
    base = "https://homes.cs.washington.edu/~ranjay/visualgenome/data/dataset/"
    return Manifest("vg", (
        RemoteFile("images.zip", "https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", 9_731_705_982),
        RemoteFile("images2.zip", "https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", 5_471_658_058),
        RemoteFile("image_data.json.zip", base + "image_data.json.zip", 1_780_854),
        RemoteFile("region_descriptions.json.zip", base + "region_descriptions.json.zip", 127_377_968),
    ))


def read(files: AnnotationFiles) -> SourceRecords:
    held_out = files.catalogued("coco", HELD_OUT_SPLITS)
    if not held_out:
        raise MissingInput("vg: build the coco catalog first (VG pre-training excludes COCO Karpathy val and test)")
    return read_visual_genome(files.find("image_data.json"), files.find("region_descriptions.json"), held_out)


def write_synthetic(writer: SyntheticWriter, count: int, corpus: SyntheticCorpus) -> SyntheticPart:
    """VG images (half in images.zip, half in images2.zip), image_data and region_descriptions; the
    first images carry coco_ids of COCO's test, val and train images."""
    coco = corpus.splits["coco"]
    linked = coco["test"][:3] + coco["val"][:1] + coco["train"][:2]  # coco_ids carried by VG images
    members, image_data, regions = {"VG_100K": {}, "VG_100K_2": {}}, [], []
    for position in range(count):
        image_id, folder = position + 1, "VG_100K" if position < count // 2 else "VG_100K_2"
        coco_id = int(linked[position]) if position < len(linked) else None
        if coco_id is not None and any(str(coco_id) in coco[split] for split in HELD_OUT_SPLITS):
            corpus.vg_held_out.append(str(image_id))
        image, phrases = writer.scene(count=3)
        members[folder][f"{folder}/{image_id}.jpg"] = image_payload(image, None)
        image_data.append({"image_id": image_id, "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg",
                           "width": writer.size, "height": writer.size, "coco_id": coco_id, "flickr_id": None})
        regions.append({"id": image_id, "regions": [
            {"region_id": 10 * image_id + k, "image_id": image_id, "phrase": phrase, "x": 0, "y": 0,
             "width": writer.size, "height": writer.size} for k, phrase in enumerate(phrases)]})
    files = (writer.write("vg/images.zip", zip_files(members["VG_100K"])),
             writer.write("vg/images2.zip", zip_files(members["VG_100K_2"])),
             writer.write("vg/image_data.json.zip", zip_files({"image_data.json": json.dumps(image_data).encode()})),
             writer.write("vg/region_descriptions.json.zip",
                          zip_files({"region_descriptions.json": json.dumps(regions).encode()})))
    return SyntheticPart(files, {"pretrain": [str(entry["image_id"]) for entry in image_data]})


DATASET = Dataset(
    name="vg", title="Visual Genome region descriptions", format_name="Visual Genome",
    splits=("pretrain",), train_split="pretrain", val_split=None, evaluation_splits=(),
    manifest=manifest, read=read, write_synthetic=write_synthetic, needs=("coco",),
    image_layout="VG_100K/ and VG_100K_2/ as the image zips unpack",
)

"""COCO captions in Karpathy's splits: the paper's main fine-tuning and test set.

Downloads (built in; sizes and MD5s as published):
| file | URL | bytes |
|---|---|---|
| train2014.zip | http://images.cocodataset.org/zips/train2014.zip | 13,510,573,713 |
| val2014.zip | http://images.cocodataset.org/zips/val2014.zip | 6,645,013,297 |
| annotations_trainval2014.zip | http://images.cocodataset.org/annotations/annotations_trainval2014.zip | 252,872,794 |
| caption_datasets.zip | Karpathy's split files (no published size or hash) | |
Splits: train 82,783 + restval 30,504 (both train here), val 5,000, test 5,000; about five captions
per image. dataset_coco.json's entries name their folder (`filepath`) and carry a `cocoid`.
"""

import json

from storage.datasets import AnnotationFiles, Dataset
from storage.manifests import KARPATHY_URL, Manifest, RemoteFile
from storage.sources import COCO_LAYOUT, SourceRecords, read_karpathy
from storage.synthetic import (COCO_DEFECTS, SyntheticCorpus, SyntheticPart, SyntheticWriter, image_payload,
                               karpathy_entry, split_of, zip_files)


def manifest() -> Manifest:
    return Manifest("coco", (
        RemoteFile("train2014.zip", "http://images.cocodataset.org/zips/train2014.zip",
                   13_510_573_713, "0da8c0bd3d6becc4dcb32757491aca88"),
        RemoteFile("val2014.zip", "http://images.cocodataset.org/zips/val2014.zip",
                   6_645_013_297, "a3d79f5ed8d289b7a7554ce06a5782b3"),
        RemoteFile("annotations_trainval2014.zip",
                   "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                   252_872_794, "0a379cfc70b0e71301e0f377548639bd"),
        RemoteFile("caption_datasets.zip", KARPATHY_URL),
    ))


def read(files: AnnotationFiles) -> SourceRecords:
    return read_karpathy(files.find("dataset_coco.json"), COCO_LAYOUT)


def write_synthetic(writer: SyntheticWriter, count: int, corpus: SyntheticCorpus) -> SyntheticPart:
    """COCO image zips and caption annotations, with the defects real data has in the first images."""
    shares = (("train", 0.4), ("restval", 0.2), ("val", 0.2), ("test", 0.2))
    members = {"train2014": {}, "val2014": {}}
    annotations = {folder: {"images": [], "annotations": []} for folder in members}
    entries, splits = [], {}
    for position in range(count):
        cocoid, split = 100_000 + 37 * position, split_of(position, count, shares)
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        image, captions = writer.scene()
        defect = COCO_DEFECTS[position] if writer.with_defects and position < len(COCO_DEFECTS) else None
        if defect:
            corpus.defects[str(cocoid)] = defect
        payload = image_payload(image, defect)
        if payload is not None:
            members[folder][f"{folder}/{filename}"] = payload
        entries.append(karpathy_entry(position, filename, split, captions, 5 * position,
                                      filepath=folder, cocoid=cocoid))
        annotations[folder]["images"].append({"id": cocoid, "file_name": filename, "width": writer.size,
                                              "height": writer.size})
        annotations[folder]["annotations"] += [{"id": 5 * position + k, "image_id": cocoid, "caption": text}
                                               for k, text in enumerate(captions)]
        splits.setdefault("train" if split == "restval" else split, []).append(str(cocoid))
    annotation_zip = zip_files({f"annotations/captions_{folder}.json": json.dumps(content).encode()
                                for folder, content in annotations.items()})
    files = [writer.write(f"coco/{folder}.zip", zip_files(content)) for folder, content in members.items()]
    files.append(writer.write("coco/annotations_trainval2014.zip", annotation_zip))
    return SyntheticPart(tuple(files), splits, entries)


DATASET = Dataset(
    name="coco", title="COCO (Karpathy splits)", format_name="COCO",
    splits=("train", "val", "test"), train_split="train", val_split="val", evaluation_splits=("val", "test"),
    manifest=manifest, read=read, write_synthetic=write_synthetic,
    image_layout="train2014/ and val2014/ as the image zips unpack (the split file's filepath)",
)

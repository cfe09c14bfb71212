"""NoCaps: novel-object captioning, evaluation only (val and test), scored by domain.

Downloads (built in; no published sizes or hashes): nocaps_val_image_info.json and
nocaps_test_image_info.json (https://s3.amazonaws.com/nocaps/), whose images are fetched one URL
each (`coco_url`) into val/ and test/, and nocaps_val_4500_captions.json (COCO layout, ten
captions per image, some with a trailing space). The image-info files carry no domain: val
domains come, where they come at all, with the images of the val captions file; test domains
and test references are private to the evaluation server, which takes a JSON list of
{"image_id", "caption"} and reports in-domain, near-domain, out-domain and overall scores.
Val 4,500 images (648 / 2,938 / 914); test 10,600 (1,311 / 7,406 / 1,883).
"""

import json

from storage.datasets import AnnotationFiles, Dataset
from storage.manifests import ImageList, Manifest, RemoteFile
from storage.sources import NOCAPS_DOMAINS, SYNTHETIC_MARK, SourceRecords, read_nocaps
from storage.synthetic import SyntheticCorpus, SyntheticPart, SyntheticWriter, image_payload

IMAGE_LISTS = (ImageList("nocaps_val_image_info.json", "val"), ImageList("nocaps_test_image_info.json", "test"))


def manifest() -> Manifest:
    return Manifest("nocaps", (
        RemoteFile("nocaps_val_image_info.json", "https://s3.amazonaws.com/nocaps/nocaps_val_image_info.json"),
        RemoteFile("nocaps_test_image_info.json", "https://s3.amazonaws.com/nocaps/nocaps_test_image_info.json"),
        RemoteFile("nocaps_val_4500_captions.json", "https://nocaps.s3.amazonaws.com/nocaps_val_4500_captions.json"),
    ), IMAGE_LISTS)


def read(files: AnnotationFiles) -> SourceRecords:
    records = read_nocaps(files.find("nocaps_val_image_info.json"), "val", files.find("nocaps_val_*captions.json"))
    records.images += read_nocaps(files.find("nocaps_test_image_info.json"), "test").images
    return records


def write_synthetic(writer: SyntheticWriter, count: int, corpus: SyntheticCorpus) -> SyntheticPart:
    """Image info for val and test as NoCaps ships it (one URL per image, no domain) and the val
    captions in COCO layout (10 per image, some with a trailing space) whose images name their
    domain, the only place a NoCaps file does."""
    files, splits = [], {}
    header = {SYNTHETIC_MARK: True, "licenses": [{"url": "https://creativecommons.org/licenses/by/2.0/", "id": 0,
                                                  "name": "Attribution 2.0 Generic (CC BY 2.0)"}]}
    for split, first_id in (("val", 0), ("test", count)):  # test ids follow val's, as NoCaps numbers them
        images, annotations = [], []
        for image_id in range(first_id, first_id + count):
            image, captions = writer.scene(count=10)
            file_name = f"{writer.rng.getrandbits(64):016x}.jpg"
            writer.write(f"nocaps/{split}/{file_name}", image_payload(image, None))
            images.append({"id": image_id, "open_images_id": file_name[:-4], "file_name": file_name,
                           "coco_url": writer.url(f"nocaps/{split}/{file_name}"), "height": writer.size,
                           "width": writer.size, "license": 0, "date_captured": "2018-11-06 11:04:33"})
            annotations += [{"image_id": image_id, "id": 10 * image_id + k, "caption": text + " " * (k == 0)}
                            for k, text in enumerate(captions)]
            splits.setdefault(split, []).append(str(image_id))
        info = {**header, "info": {"description": f"nocaps {split} dataset", "version": "0.2"}, "images": images}
        files.append(writer.write(f"nocaps/nocaps_{split}_image_info.json", json.dumps(info).encode()))
        if split == "val":
            with_domains = [{**entry, "domain": NOCAPS_DOMAINS[entry["id"] % 3]} for entry in images]
            captions_file = {**info, "images": with_domains, "annotations": annotations}
            files.append(writer.write("nocaps/nocaps_val_4500_captions.json", json.dumps(captions_file).encode()))
    return SyntheticPart(tuple(files), splits, image_lists=IMAGE_LISTS)


DATASET = Dataset(
    name="nocaps", title="NoCaps", format_name="NoCaps",
    splits=("val", "test"), train_split=None, val_split=None, evaluation_splits=("val", "test"),
    manifest=manifest, read=read, write_synthetic=write_synthetic,
    image_layout="val/ and test/, each image fetched from its own URL in the image-info files",
    domains=NOCAPS_DOMAINS, server_only_split="test",
)

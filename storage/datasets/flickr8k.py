"""Flickr8k in Karpathy's splits (Hodosh, Young and Hockenmaier, 2013): a small fine-tuning and test set.

Annotations: dataset_flickr8k.json in Karpathy's caption_datasets.zip (no published size or hash:
the download records what it fetched), in the Flickr30k file's schema: {"dataset": "flickr8k",
"images": [{"filename": "2513260012_03d33305cf.jpg", "imgid": 0, "split": "train", "sentids":
[0, ..., 4], "sentences": [{"raw": "A black dog is running after a white dog in the snow .",
"tokens": [...], "imgid": 0, "sentid": 0}, ...]}, ...]}; no `filepath` or `cocoid`, so an image's
id is its file-name stem (<flickr id>_<secret>).
Splits: 8,000 images, train 6,000, val 1,000, test 1,000; five captions each.
Images: Flickr8k_Dataset.zip, one flat folder `Flicker8k_Dataset/` (sic) of 8,091 JPEGs named as
in the split file (91 of them in no split). The dataset's authors hand it out on request; the
public copy most used is https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip
(about 1 GB; no published size or hash), the built-in download. `--images URL_OR_ARCHIVE` takes
another copy instead.
"""

import hashlib

from storage.datasets import AnnotationFiles, Dataset
from storage.manifests import KARPATHY_URL, Manifest, RemoteFile
from storage.sources import KarpathyLayout, SourceRecords, read_karpathy
from storage.synthetic import SyntheticCorpus, SyntheticPart, SyntheticWriter, write_flat_archive_part

IMAGE_FOLDER = "Flicker8k_Dataset"  # sic: the image archive's top folder
IMAGES_URL = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"


def manifest() -> Manifest:
    return Manifest("flickr8k", (RemoteFile("Flickr8k_Dataset.zip", IMAGES_URL),
                                 RemoteFile("caption_datasets.zip", KARPATHY_URL)))


def read(files: AnnotationFiles) -> SourceRecords:
    return read_karpathy(files.find("dataset_flickr8k.json"), KarpathyLayout(IMAGE_FOLDER))


def write_synthetic(writer: SyntheticWriter, count: int, corpus: SyntheticCorpus) -> SyntheticPart:
    """Flickr8k_Dataset.zip and the split file's entries, files named as Flickr names them
    (<photo id>_<secret>.jpg), split 6:1:1 as the real one."""
    names = [f"{2_000_000_000 + 7919 * position}_{hashlib.md5(str(position).encode()).hexdigest()[:10]}.jpg"
             for position in range(count)]
    return write_flat_archive_part(writer, count, "flickr8k/Flickr8k_Dataset.zip", IMAGE_FOLDER, names,
                                   (("train", 0.75), ("val", 0.125), ("test", 0.125)))


DATASET = Dataset(
    name="flickr8k", title="Flickr8k (Karpathy splits)", format_name="Flickr8k",
    splits=("train", "val", "test"), train_split="train", val_split="val", evaluation_splits=("val", "test"),
    manifest=manifest, read=read, write_synthetic=write_synthetic,
    image_layout=f"{IMAGE_FOLDER}/<filename> (or anywhere under data/flickr8k/, found by name)",
)

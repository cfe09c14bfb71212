"""Flickr30k in Karpathy's splits: the paper's second fine-tuning and test set.

Annotations: dataset_flickr30k.json in Karpathy's caption_datasets.zip (no published size or
hash), the COCO file's schema without `filepath` or `cocoid`; an image's id is its file-name stem.
Splits: train 29,000, val 1,014, test 1,000; five captions per image.
Images: access-gated (a request form on the dataset's home page), so the archive comes from the
user: `ituning download flickr30k --images URL_OR_ARCHIVE`. It unpacks to flickr30k-images/.
"""

from storage.datasets import AnnotationFiles, Dataset
from storage.manifests import KARPATHY_URL, Manifest, RemoteFile
from storage.sources import KarpathyLayout, SourceRecords, read_karpathy
from storage.synthetic import SyntheticCorpus, SyntheticPart, SyntheticWriter, write_flat_archive_part

IMAGE_FOLDER = "flickr30k-images"  # the image archive's top folder


def manifest() -> Manifest:
    return Manifest("flickr30k", (RemoteFile("caption_datasets.zip", KARPATHY_URL),))


def read(files: AnnotationFiles) -> SourceRecords:
    return read_karpathy(files.find("dataset_flickr30k.json"), KarpathyLayout(IMAGE_FOLDER))


def write_synthetic(writer: SyntheticWriter, count: int, corpus: SyntheticCorpus) -> SyntheticPart:
    """The image archive a user supplies, and the split file's entries."""
    names = [f"{1_000_000 + position}.jpg" for position in range(count)]
    return write_flat_archive_part(writer, count, f"flickr30k/{IMAGE_FOLDER}.zip", IMAGE_FOLDER, names,
                                   (("train", 0.7), ("val", 0.15), ("test", 0.15)))


DATASET = Dataset(
    name="flickr30k", title="Flickr30k (Karpathy splits)", format_name="Flickr30k",
    splits=("train", "val", "test"), train_split="train", val_split="val", evaluation_splits=("val", "test"),
    manifest=manifest, read=read, write_synthetic=write_synthetic,
    image_layout=f"{IMAGE_FOLDER}/<filename> (or anywhere under data/flickr30k/, found by name)",
    images_on_request="Flickr30k images are access-gated; pass --images URL_OR_ARCHIVE to fetch them",
)

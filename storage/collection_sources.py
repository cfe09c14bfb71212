"""The images of a collection to caption, listed without decoding them and cut into shards.

A collection is one of:

- a folder: every file below it, recursively and in path order, whose first bytes are those of an
  image format (JPEG, PNG, GIF, WebP, BMP, TIFF), whatever its name; a file whose name says image
  but whose bytes do not is listed too, so that a damaged photo gets a row saying why rather than no
  row. Keys are the paths relative to the folder.
- a list: a .txt file (one path or URL a line), or a .csv or .parquet file with a `url` (or `path`)
  column and optional `key` and `caption` columns: img2dataset's input and its output Parquet.
  Relative paths are relative to the list's folder; keys come from `key`, else the row number.
- WebDataset tar shards as img2dataset writes them: a .tar path or http(s) URL, or several written
  with a brace range (`shards/{00000..00009}.tar`). Each tar is a shard; its images are the members
  KEY.jpg (.png, .webp ...) and KEY.json / KEY.txt beside them give the caption img2dataset kept.

Tars are read with the standard tarfile module, in stream order: webdataset's own reader would add
a dependency, and its default decoders unpickle `.pyd`/`.pickle` members, which a downloaded tar
must never get to do. Member names are never used as paths here.
"""

import csv
import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
LIST_SUFFIXES = {".txt", ".csv", ".parquet"}
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
URL_COLUMNS = ("url", "path")


class CollectionSourceError(ValueError):
    """A collection source that cannot be listed: missing, of an unknown kind, or a list without a URL column."""


@dataclass(frozen=True)
class Item:
    key: str
    source: str  # a path, a URL, or "TAR#MEMBER" for a tar member
    given_caption: str | None = None  # the caption the source came with (img2dataset's `caption`), if any


@dataclass(frozen=True)
class Shard:
    index: int
    items: tuple[Item, ...] = ()  # folder and list shards
    tar: str | None = None  # a tar shard: its path or URL; its items are found when it is read

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"


@dataclass(frozen=True)
class Collection:
    source: str
    kind: str  # "folder", "list" or "tars"
    shards: tuple[Shard, ...]

    def fingerprint(self) -> str:
        """sha256 over what was listed (keys and sources, or the tars): a changed source is another collection."""
        digest = hashlib.sha256(f"{self.kind}\n".encode())
        for shard in self.shards:
            digest.update(f"{shard.index}\t{shard.tar or ''}\n".encode())
            for item in shard.items:
                digest.update(f"{item.key}\t{item.source}\n".encode())
        return digest.hexdigest()

    @property
    def listed_images(self) -> int | None:
        """The number of images, where known before the tars are read."""
        return None if self.kind == "tars" else sum(len(shard.items) for shard in self.shards)


def is_url(text: str) -> bool:
    return urlsplit(text).scheme in ("http", "https")


def list_collection(source: str, shard_size: int = 1000) -> Collection:
    """The collection `source` names (see the module docstring), cut into shards of `shard_size` images
    (a tar is one shard whatever its size)."""
    if shard_size < 1:
        raise CollectionSourceError(f"shard size {shard_size}: give 1 or more")
    tars = tar_sources(source)
    if tars:
        return Collection(source, "tars", tuple(Shard(index, tar=tar) for index, tar in enumerate(tars)))
    path = Path(source)
    if path.is_dir():
        return Collection(source, "folder", _cut(folder_items(path), shard_size))
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return Collection(source, "list", _cut(list_items(path), shard_size))
    if not path.exists():
        raise CollectionSourceError(f"{source}: no such folder, list or tar; give a folder of images, a .txt/.csv/"
                                    ".parquet list, or WebDataset .tar shards")
    raise CollectionSourceError(f"{source}: not a folder, a .txt/.csv/.parquet list or a .tar shard")


def _cut(items: list[Item], shard_size: int) -> tuple[Shard, ...]:
    return tuple(Shard(index, tuple(items[start:start + shard_size]))
                 for index, start in enumerate(range(0, len(items), shard_size)))


def tar_sources(source: str) -> list[str]:
    """The tars a source names (a brace range expanded), or [] when it names none."""
    if not urlsplit(source).path.lower().endswith(".tar"):
        return []
    found = BRACE_RANGE.search(source)
    if not found:
        names = [source]
    else:
        first, last = found.group(1), found.group(2)
        width = len(first) if len(first) == len(last) else 0
        names = [source[:found.start()] + str(number).zfill(width) + source[found.end():]
                 for number in range(int(first), int(last) + 1)]
    missing = [name for name in names if not is_url(name) and not Path(name).is_file()]
    if missing:
        raise CollectionSourceError(f"{missing[0]}: no such tar shard" + (f" (and {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
    return names


# ---- folders -------------------------------------------------------------------------------------


def folder_items(folder: Path) -> list[Item]:
    """The image files below `folder` (see the module docstring), keyed by their relative path."""
    items = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or looks_like_image(path)):
            items.append(Item(path.relative_to(folder).as_posix(), str(path)))
    return items


def looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError:
        return False
    return head.startswith(SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


# ---- lists ---------------------------------------------------------------------------------------


def list_items(path: Path) -> list[Item]:
    """The rows of a .txt, .csv or .parquet list as items (see the module docstring)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        rows = [{"url": line} for line in lines if line and not line.startswith("#")]
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    else:
        import pyarrow.parquet as parquet

        rows = parquet.read_table(path).to_pylist()
    column = next((name for name in URL_COLUMNS if rows and name in rows[0]), None)
    if rows and column is None:
        raise CollectionSourceError(f"{path}: a list needs a `url` or `path` column (it has {', '.join(rows[0])})")
    items = [_list_item(row, column, number, path.parent) for number, row in enumerate(rows)]
    _check_unique_keys(items, path)
    return items


def _list_item(row: dict, column: str, number: int, folder: Path) -> Item:
    where = str(row[column] or "").strip()
    if where and not is_url(where) and not Path(where).is_absolute():
        where = str(folder / where)
    key = row.get("key")
    caption = row.get("caption")
    return Item(str(key) if key not in (None, "") else f"{number:09d}", where, str(caption) if caption else None)


def _check_unique_keys(items: list[Item], path: Path) -> None:
    seen = set()
    for item in items:
        if item.key in seen:
            raise CollectionSourceError(f"{path}: the key {item.key!r} names two rows; keys must be unique")
        seen.add(item.key)


# ---- tars ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarSample:
    key: str
    member: str  # the image member's name, or the sidecar's when the sample has no image
    image: bytes | None  # None: no image member, or one over the size limit (`too_large`)
    given_caption: str | None = None
    too_large: bool = False


def tar_samples(file: BinaryIO, max_image_bytes: int) -> Iterator[TarSample]:
    """The samples of a WebDataset tar read as a stream: members grouped by key (the name up to the
    first dot of its file name, as WebDataset groups them), images over `max_image_bytes` not read."""
    current, parts = None, {}
    with tarfile.open(fileobj=file, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, _, extension = _split_member_name(member.name)
            if key != current and parts:
                yield _sample(current, parts)
                parts = {}
            current = key
            if extension in IMAGE_SUFFIXES and member.size > max_image_bytes:
                parts["image"] = (member.name, None, True)
            elif extension in IMAGE_SUFFIXES or extension in (".json", ".txt"):
                parts["image" if extension in IMAGE_SUFFIXES else extension] = (
                    member.name, archive.extractfile(member).read(), False)
    if parts:
        yield _sample(current, parts)


def _split_member_name(name: str) -> tuple[str, str, str]:
    """("folder/KEY", "KEY", ".ext") of "folder/KEY.ext" (".ext" being the last suffix, lowercase)."""
    folder, _, base = name.rpartition("/")
    stem, dot, rest = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, stem, ("." + rest.rsplit(".", 1)[-1].lower()) if dot else ""


def _sample(key: str, parts: dict) -> TarSample:
    caption = None
    if ".txt" in parts:
        caption = parts[".txt"][1].decode("utf-8", "replace").strip() or None
    elif ".json" in parts:
        try:
            caption = json.loads(parts[".json"][1]).get("caption") or None
        except (ValueError, AttributeError):
            caption = None
    name, data, too_large = parts.get("image") or next(iter(parts.values()))
    return TarSample(key, name, data if "image" in parts else None, caption, too_large)

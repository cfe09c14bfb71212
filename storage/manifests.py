"""What to download for a dataset: a manifest (its module's built-in one, storage/datasets/, or a
manifest file that replaces it).

A manifest file is JSON:
    {"dataset": "coco",
     "files": [{"name": "val2014.zip", "url": "http://...", "bytes": 6645013297, "md5": "a3d7...",
                "unpack": true}],
     "image_lists": [{"info": "nocaps_val_image_info.json", "into": "val"}],
     "synthetic": false}
`bytes` (an integer >= 0), `md5`/`sha256` (32/64 hexadecimal digits) and `unpack` (true/false) are
optional (archives unpack by default). An image list names one of the files, a COCO-style image-info
JSON whose entries carry one URL each (`coco_url`); every image is fetched into
data/<dataset>/<into>/<file_name>, from the URLs that storage/listed_urls.py allows a downloaded list.
`synthetic` (default false) marks files made in the dataset's format that are not the dataset (the
corpus of storage/synthetic.py); the download records it and the catalog keeps it per dataset.
"""

import json
import string
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

from storage.jsonfields import MalformedInput, required

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
KARPATHY_URL = "http://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


class ManifestError(MalformedInput):
    """A manifest file that cannot be used (the message names the file and field)."""


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    bytes: int | None = None
    md5: str | None = None
    sha256: str | None = None
    unpack: bool | None = None  # None: unpack archives, keep other files as they are

    @property
    def should_unpack(self) -> bool:
        return is_archive(self.name) if self.unpack is None else self.unpack

    @property
    def expected_checksum(self) -> str | None:
        """'md5:<hex>' or 'sha256:<hex>', or None when nothing is published."""
        if self.sha256:
            return f"sha256:{self.sha256.lower()}"
        return f"md5:{self.md5.lower()}" if self.md5 else None


@dataclass(frozen=True)
class ImageList:
    info: str
    into: str


@dataclass(frozen=True)
class Manifest:
    dataset: str
    files: tuple[RemoteFile, ...]
    image_lists: tuple[ImageList, ...] = field(default=())
    synthetic: bool = False  # files made in the dataset's format, not the dataset itself

    def with_file(self, extra: RemoteFile) -> "Manifest":
        """The manifest with `extra` added (in place of a file of the same name)."""
        kept = tuple(item for item in self.files if item.name != extra.name)
        return replace(self, files=kept + (extra,))


def user_file(url_or_path: str) -> RemoteFile:
    """A file named by a URL or a local path (e.g. an image archive given on request), under the
    last segment of its path."""
    from urllib.parse import unquote, urlparse

    return RemoteFile(Path(unquote(urlparse(url_or_path).path).rstrip("/")).name, url_or_path)


def load_manifest(path: Path) -> Manifest:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:  # ValueError: not JSON, not UTF-8
        raise ManifestError(f"{path}: cannot read manifest ({error})") from error
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a JSON object at the top level, found {type(raw).__name__}")
    dataset = _field(raw, "dataset", str, path)
    if not isinstance(raw.get("image_lists", []), list):
        raise ManifestError(f"{path}: field image_lists must be list")
    files = tuple(_remote_file(entry, f"files[{index}]", path)
                  for index, entry in enumerate(_field(raw, "files", list, path)))
    lists = tuple(_image_list(entry, f"image_lists[{index}]", path)
                  for index, entry in enumerate(raw.get("image_lists", [])))
    synthetic = raw.get("synthetic", False)
    if not isinstance(synthetic, bool):
        raise ManifestError(f"{path}: field synthetic must be true or false, not {synthetic!r}")
    return Manifest(dataset, files, lists, synthetic)


def _image_list(entry, where: str, path: Path) -> ImageList:
    info, into = _field(entry, "info", str, path, where), _field(entry, "into", str, path, where)
    if not _plain_name(info):
        raise ManifestError(f"{path}: field {where}.info must be a plain file name, not {info!r}")
    parts = PurePosixPath(into.replace("\\", "/")).parts
    if parts[:1] == ("/",) or ".." in parts or PureWindowsPath(into).drive:
        raise ManifestError(f"{path}: field {where}.into must be a folder inside the data folder, not {into!r}")
    return ImageList(info, into)


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _remote_file(entry, where: str, path: Path) -> RemoteFile:
    if not isinstance(entry, dict):
        raise ManifestError(f"{path}: {where} must be an object")
    name = _field(entry, "name", str, path, where)
    if not _plain_name(name):
        raise ManifestError(f"{path}: field {where}.name must be a plain file name, not {name!r}")
    url = _field(entry, "url", str, path, where)
    if not url.strip():
        raise ManifestError(f"{path}: field {where}.url is empty")
    size = entry.get("bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ManifestError(f"{path}: field {where}.bytes must be an integer of at least 0, not {size!r}")
    unpack = entry.get("unpack")
    if unpack is not None and not isinstance(unpack, bool):
        raise ManifestError(f"{path}: field {where}.unpack must be true or false, not {unpack!r}")
    md5, sha256 = _digest(entry, "md5", 32, where, path), _digest(entry, "sha256", 64, where, path)
    return RemoteFile(name, url, size, md5, sha256, unpack)


def _digest(entry: dict, key: str, length: int, where: str, path: Path) -> str | None:
    """A published checksum: `length` hexadecimal digits, or None when the field is absent."""
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != length or not all(c in string.hexdigits for c in value):
        raise ManifestError(f"{path}: field {where}.{key} must be {length} hexadecimal digits, not {value!r}")
    return value


def _field(entry, key: str, kind: type, path: Path, where: str = ""):
    return required(entry, key, kind, path, where, error=ManifestError)


def manifest_to_json(manifest: Manifest) -> dict:
    files = [{key: value for key, value in vars(item).items() if value is not None} for item in manifest.files]
    return {"dataset": manifest.dataset, "files": files,
            "image_lists": [vars(item) for item in manifest.image_lists],
            **({"synthetic": True} if manifest.synthetic else {})}

"""The fingerprint of a split's image list: one function for the catalog and the feature cache.

The catalog reports it to MLflow and to the pipeline's task caches, the feature cache keeps it in
its identity, and training compares the two, so they must agree however a path is spelled. Each
path is normalised first: a relative one is taken from `base` (the catalog passes its own folder,
the workspace; a plain list means the working directory), `.` and `..`, repeated and trailing
separators are folded, and symlinks in its folders are resolved. So `ws/data/./a.jpg`,
`/abs/ws/data/a.jpg` and the same file through a symlinked workspace give one line. The file name
itself is kept as listed: an image that is a link is still the image the catalog names.
A path inside `root` (the workspace) is written relative to it, so a copied or moved workspace
keeps its fingerprints.
"""

import hashlib
import os
from pathlib import Path


def normalised_path(path: str | Path, base: str | Path | None = None, folders: dict | None = None) -> str:
    """The absolute path with its folders resolved, as the fingerprint sees it. `folders` caches
    resolved folders across the calls of one fingerprint (a split has few folders, many files)."""
    path = os.fspath(path)
    joined = path if os.path.isabs(path) else f"{os.getcwd() if base is None else os.fspath(base)}{os.sep}{path}"
    folder, _, name = (joined.rstrip(os.sep) or os.sep).rpartition(os.sep)
    if name in ("", ".", ".."):  # the path names a folder, not a file
        folder, name = joined, ""
    folders = {} if folders is None else folders
    real = folders.get(folder)
    if real is None:
        real = folders[folder] = os.path.realpath(folder or os.sep)
    return f"{real.rstrip(os.sep)}{os.sep}{name}" if name else real


def image_list_fingerprint(images, base: str | Path | None = None, root: str | Path | None = None) -> str:
    """sha256 over "image_id<TAB>normalised path<LF>" lines of (image_id, path) pairs, in image-id order;
    paths inside `root` relative to it."""
    base, folders = os.getcwd() if base is None else os.fspath(base), {}
    inside = "" if root is None else f"{os.path.realpath(root).rstrip(os.sep)}{os.sep}"
    pairs = sorted((str(image_id), _within(normalised_path(path, base, folders), inside)) for image_id, path in images)
    return hashlib.sha256("".join(f"{image_id}\t{path}\n" for image_id, path in pairs).encode()).hexdigest()


def _within(path: str, root: str) -> str:
    """`path` relative to the folder `root` ("/ws/") when it lies inside it."""
    return f".{os.sep}{path[len(root):]}" if root and path.startswith(root) else path

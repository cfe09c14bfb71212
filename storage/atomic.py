"""Files written whole or not at all: readers, and a run that crashed half-way, see either the old
content or the new, never a part."""

import os
import threading
from pathlib import Path


def write_atomically(path: Path, content: str | bytes, durable: bool = False) -> None:
    """Write `content` to a temporary file beside `path`, then rename it over `path`. The temporary
    name is unique to this process and thread, so concurrent writers never share one. `durable`
    also flushes the file and its folder to disk before and after the rename."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(temporary, "wb") as file:
            file.write(content.encode() if isinstance(content, str) else content)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if durable:
        sync_folder(path.parent)


def sync_file(path: Path) -> None:
    """Flush a written file's content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

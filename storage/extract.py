"""Safe unpacking of zip and tar archives.

Every entry is checked before anything is written: one that would land outside the target folder
(absolute path, drive letter, `..`), a symlink or hard link, or a device/FIFO entry is refused with
an error naming it. A marker file records each archive unpacked, so a second run skips it.
"""

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafeArchive(ValueError):
    """An archive with an entry that must not be unpacked (the message names the entry)."""


def check_entry_name(archive: Path, name: str) -> None:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive or ".." in posix.parts:
        raise UnsafeArchive(f"{archive.name}: entry {name!r} would be written outside the target folder")


def _zip_entries(archive: Path, handle: zipfile.ZipFile) -> int:
    total = 0
    for info in handle.infolist():
        check_entry_name(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchive(f"{archive.name}: entry {info.filename!r} is a symbolic link")
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise UnsafeArchive(f"{archive.name}: entry {info.filename!r} is a device or special file")
        total += info.file_size
    return total


def _tar_entries(archive: Path, handle: tarfile.TarFile) -> int:
    total = 0
    for member in handle.getmembers():
        check_entry_name(archive, member.name)
        if member.issym() or member.islnk():
            raise UnsafeArchive(f"{archive.name}: entry {member.name!r} is a link")
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchive(f"{archive.name}: entry {member.name!r} is a device or special file")
        total += member.size
    return total


def unpack(archive: Path, target: Path) -> bool:
    """Unpack `archive` into `target`; False when a marker says it was already unpacked."""
    marker = target / f".unpacked-{archive.name}"
    stamp = f"{archive.stat().st_size} {archive.stat().st_mtime_ns}"
    if marker.is_file() and marker.read_text() == stamp:
        return False
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            _require_space(target, _zip_entries(archive, handle))
            handle.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as handle:
            _require_space(target, _tar_entries(archive, handle))
            handle.extractall(target, filter="data")
    else:
        raise UnsafeArchive(f"{archive.name}: neither a zip nor a tar archive")
    marker.write_text(stamp)
    return True


def _require_space(target: Path, needed: int) -> None:
    free = shutil.disk_usage(target).free
    if needed > free:
        raise OSError(f"not enough free space in {target} to unpack: need {needed:,} bytes, {free:,} free")

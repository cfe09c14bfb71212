"""Verified, resumable downloads.

Each file is fetched to `<name>.part`, resumed with an HTTP Range request after an interruption,
checked against its published size and checksum and only then renamed to its final name. Transient
failures (connection cut, timeouts, 5xx, 429) are retried with exponential back-off; permanent ones
(other 4xx, a checksum still wrong after a full re-download) fail at once. Verified files are
recorded in `verified.json` beside them and skipped on the next run while size and mtime match.
"""

import hashlib
import json
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from tqdm import tqdm

from storage.atomic import write_atomically
from storage.jsonfields import MalformedInput
from storage.manifests import RemoteFile

LEDGER = "verified.json"


class DownloadError(RuntimeError):
    """A download that failed for good (the message names the file and why)."""


class TransientFailure(Exception):
    """A failure worth retrying after a pause."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    first_wait_s: float = 1.0
    max_wait_s: float = 60.0

    def wait(self, attempt: int) -> float:
        return min(self.max_wait_s, self.first_wait_s * 2 ** attempt)


@dataclass(frozen=True)
class VerifiedFile:
    name: str
    url: str
    bytes: int
    checksum: str
    verified_at: str
    mtime_ns: int


class Ledger:
    """The verified files of one download folder, kept in verified.json (safe across threads)."""

    def __init__(self, folder: Path):
        self.path = folder / LEDGER
        self._lock = threading.Lock()
        try:
            raw = json.loads(self.path.read_text()) if self.path.is_file() else {}
            self.records = {name: VerifiedFile(**record) for name, record in raw.items()}
        except (ValueError, TypeError, AttributeError) as error:
            raise MalformedInput(f"{self.path}: damaged ({error}); delete it and run again "
                                f"(files with a published checksum are verified again, not fetched)") from error

    def is_current(self, remote: RemoteFile, path: Path) -> bool:
        record = self.records.get(remote.name)
        if record is None or not path.is_file() or record.url != remote.url:
            return False
        stat = path.stat()
        return stat.st_size == record.bytes and stat.st_mtime_ns == record.mtime_ns

    def add(self, record: VerifiedFile) -> None:
        with self._lock:
            self.records[record.name] = record

    def save(self) -> None:
        with self._lock:
            payload = {name: asdict(record) for name, record in sorted(self.records.items())}
            write_atomically(self.path, json.dumps(payload, indent=1))


def file_checksum(path: Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as handle:
        return f"{algorithm}:{hashlib.file_digest(handle, algorithm).hexdigest()}"


def fetch_verified(client: httpx.Client, remote: RemoteFile, target: Path, ledger: Ledger,
                   policy: RetryPolicy = RetryPolicy(), progress: bool = False) -> VerifiedFile:
    """Download `remote` to `target` unless already verified there; return its verified record."""
    if ledger.is_current(remote, target):
        return ledger.records[remote.name]
    if remote.expected_checksum and target.is_file():  # put in place by hand (a mirror, an earlier copy)
        size, checksum = _measure(remote, target)
        if _matches(remote, size, checksum):
            return _record(remote, target, checksum, ledger)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    for _ in range(2):  # a wrong checksum earns one full re-download
        _fetch_part(client, remote, part, policy, progress)
        size, checksum = _measure(remote, part)
        if _matches(remote, size, checksum):
            part.replace(target)
            return _record(remote, target, checksum, ledger)
        part.unlink()
    raise DownloadError(f"{remote.name}: still wrong after a full re-download "
                        f"(expected {remote.bytes} bytes, {remote.expected_checksum}; got {size} bytes, {checksum})")


def _measure(remote: RemoteFile, path: Path) -> tuple[int, str]:
    algorithm = remote.expected_checksum.split(":")[0] if remote.expected_checksum else "sha256"
    return path.stat().st_size, file_checksum(path, algorithm)


def _matches(remote: RemoteFile, size: int, checksum: str) -> bool:
    return remote.bytes in (None, size) and remote.expected_checksum in (None, checksum)


def _record(remote: RemoteFile, target: Path, checksum: str, ledger: Ledger) -> VerifiedFile:
    stat = target.stat()
    record = VerifiedFile(remote.name, remote.url, stat.st_size, checksum,
                          datetime.now(timezone.utc).isoformat(timespec="seconds"), stat.st_mtime_ns)
    ledger.add(record)
    return record


def _fetch_part(client, remote: RemoteFile, part: Path, policy: RetryPolicy, progress: bool) -> None:
    local = local_source(remote.url)
    if local is not None:
        if not local.is_file():
            raise DownloadError(f"{remote.name}: no such file {local}")
        shutil.copyfile(local, part)
        return
    for attempt in range(policy.attempts):
        try:
            _stream_once(client, remote, part, progress)
            return
        except (TransientFailure, httpx.TransportError) as error:
            if attempt == policy.attempts - 1:
                raise DownloadError(f"{remote.name}: could not fetch {remote.url} after {policy.attempts} attempts "
                                    f"({error or type(error).__name__}); check the network, or give a manifest "
                                    f"naming a mirror or a local copy") from error
            time.sleep(policy.wait(attempt))


def _stream_once(client: httpx.Client, remote: RemoteFile, part: Path, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if remote.bytes is not None and offset >= remote.bytes:
        return  # complete (or too long: verification decides)
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", remote.url, headers=headers) as response:
        status = response.status_code
        if status == 416:
            part.unlink()
            raise TransientFailure("server refused the resume offset; starting over")
        if status >= 500 or status == 429:
            raise TransientFailure(f"HTTP {status}")
        if status >= 400:
            raise DownloadError(f"{remote.name}: HTTP {status} from {remote.url} (not retried); correct the URL, "
                                f"or give a manifest naming a mirror or a local copy")
        if offset and status != 206:
            offset = 0  # the server ignored the Range header: the body is the whole file
        with open(part, "ab" if offset else "wb") as out, \
                tqdm(total=remote.bytes, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=remote.name, disable=not progress, leave=False) as bar:
            for chunk in response.iter_bytes():  # as received, so a cut loses nothing
                out.write(chunk)
                bar.update(len(chunk))
    if remote.bytes is not None and part.stat().st_size < remote.bytes:
        raise TransientFailure(f"connection closed at byte {part.stat().st_size} of {remote.bytes}")


def local_source(url: str) -> Path | None:
    """The local file a URL names (a file:// URL or a plain path), or None for a network URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(url) if parsed.scheme == "" else None


def check_free_space(folder: Path, remotes: list[RemoteFile], ledger: Ledger) -> None:
    """Refuse to start when the known sizes still to fetch exceed the free space in `folder`."""
    needed = 0
    for remote in remotes:
        target = folder / remote.name
        if remote.bytes is None or ledger.is_current(remote, target):
            continue
        part = target.with_name(target.name + ".part")
        needed += remote.bytes - (part.stat().st_size if part.exists() else 0)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DownloadError(f"not enough free space in {folder}: need {needed:,} bytes, {free:,} free")

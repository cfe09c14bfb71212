"""Fetching a collection's image URLs politely and safely.

Every URL goes through pipeline/image_urls.py's `fetch_image`, so through the one public-host rule
(storage/public_urls.py: public hosts only, each redirect judged, within a byte limit) unless the
user lifts it (`--allow-private-urls`). Many URLs are fetched at once, but at most `per_host` at a
time from any one host; a transient failure (a timeout, a refused connection, HTTP 429 or 5xx) is
tried again after a doubling wait. A URL that still fails is a result with its reason, never an
exception: one dead link does not stop a shard.
"""

import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.image_urls import ImageFetchError, fetch_image
from storage.downloads import RetryPolicy
from storage.public_urls import PublicHosts

TRANSIENT_REASONS = ("timed out", "the connection failed")
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
FETCH_RETRIES = RetryPolicy(attempts=3, first_wait_s=0.5, max_wait_s=8.0)


@dataclass(frozen=True)
class FetchSettings:
    max_bytes: int = 20 * 1024 * 1024  # per image
    per_host: int = 4  # connections at once to one host
    threads: int = 16  # connections at once in all
    allow_private: bool = False  # lift the public-host rule (the user's own machine or network)
    retry: RetryPolicy = FETCH_RETRIES

    def hosts(self) -> PublicHosts:
        return PublicHosts(private_allowed=self.allow_private)


@dataclass(frozen=True)
class Fetched:
    path: Path | None  # None when the fetch failed
    error: ImageFetchError | None = None


class HostLimits:
    """A semaphore per host: at most `per_host` fetches from one host at a time."""

    def __init__(self, per_host: int):
        self._lock = threading.Lock()
        self._slots = defaultdict(lambda: threading.BoundedSemaphore(per_host))

    def slot(self, url: str) -> threading.BoundedSemaphore:
        with self._lock:
            return self._slots[(urlsplit(url).hostname or "").lower()]


def is_transient(error: ImageFetchError) -> bool:
    if error.reason in TRANSIENT_REASONS:
        return True
    return any(error.reason == f"the server answered HTTP {status}" for status in TRANSIENT_STATUS)


def fetch_with_retries(url: str, target: Path, settings: FetchSettings, hosts: PublicHosts,
                       limits: HostLimits | None = None) -> Fetched:
    """`url` saved at `target`, transient failures tried again (see the module docstring)."""
    slot = (limits or HostLimits(settings.per_host)).slot(url)
    attempt = 0
    while True:
        try:
            with slot:
                return Fetched(fetch_image(url, target, settings.max_bytes, hosts))
        except ImageFetchError as error:
            attempt += 1
            if not is_transient(error) or attempt >= settings.retry.attempts:
                return Fetched(None, error)
        time.sleep(settings.retry.wait(attempt - 1))  # outside the host's slot: others may use it meanwhile


def fetch_all(urls: dict[str, str], folder: Path, settings: FetchSettings) -> dict[str, Fetched]:
    """{name: Fetched} for {name: url}, saved into `folder` as files named by their position."""
    hosts, limits = settings.hosts(), HostLimits(settings.per_host)
    names = list(urls)
    with ThreadPoolExecutor(max_workers=max(1, min(settings.threads, len(names)))) as pool:
        results = pool.map(lambda pair: fetch_with_retries(urls[pair[1]], folder / f"url-{pair[0]:06d}",
                                                            settings, hosts, limits), enumerate(names))
        return dict(zip(names, results))


def fetch_tar(url: str, target: Path, settings: FetchSettings) -> Path:
    """A tar shard the user named by URL, saved at `target`: fetched as given (the user's own source, like
    `ituning caption URL`), with retries; ImageFetchError when it cannot be had."""
    whole = FetchSettings(max_bytes=1 << 40, per_host=1, allow_private=True, retry=settings.retry)
    fetched = fetch_with_retries(url, target, whole, whole.hosts())
    if fetched.error is not None:
        raise fetched.error
    return fetched.path

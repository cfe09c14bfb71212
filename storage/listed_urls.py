"""Which URLs an image list may send the downloader to.

A manifest is written by the user, so the URLs of its files (local paths and servers on loopback
included) are fetched as given. An image list (NoCaps' image info) is a file that was itself
downloaded, so the URL of each image it names must be either
  - http or https to a public host: not loopback, private, link-local, carrier-grade NAT,
    unspecified, reserved or multicast, whether the host is written as an address or is a name
    that resolves to one (`localhost` and `*.localhost` always count as loopback); or
  - on the image list's own origin, the place the user's manifest fetched it from: the same
    scheme, host and port when that was a URL; a file inside the list's folder when that was a
    local path (the synthetic corpus and local mirrors).
Every request is checked, redirects included, and connects through storage/public_urls.py, the one
public-host rule: to the very addresses that were judged.
"""

from pathlib import Path
from urllib.parse import urlsplit

import httpx

from storage.downloads import DownloadError, local_source
from storage.public_urls import PublicHosts, Resolver


class RefusedUrl(DownloadError):
    """A URL from an image list that the rule above does not allow."""


class ListedUrls:
    """The rule for the URLs of one image list fetched from `source` (None: a source unknown, so
    public hosts only)."""

    def __init__(self, source: str | None, resolver: Resolver | None = None):
        self._folder = _folder_of(local_source(source)) if source else None
        self._origin = _origin(source) if source and local_source(source) is None else None
        self.hosts = PublicHosts(resolver, [self._origin[1:]] if self._origin else [])
        self._public: dict[str, str | None] = {}  # host -> why it is not public (None: it is)

    def refusal(self, url: str) -> str | None:
        """Why `url` may not be fetched, or None when it may (raises DownloadError when a host
        name cannot be resolved to check it)."""
        local = local_source(url)
        if local is not None:
            if self._folder is not None and _is_inside(local, self._folder):
                return None
            return f"a local file outside {self._folder}" if self._folder else "a local file named by a downloaded list"
        origin = _origin(url)
        if origin is None:
            return "not a valid URL"
        if origin[0] not in ("http", "https") or not origin[1]:
            return "not an http(s) URL with a host"
        if origin == self._origin:
            return None
        return self._host_refusal(origin[1])

    def check_request(self, request: httpx.Request) -> None:
        """httpx request hook: refuse any request (a redirect too) the rule does not allow."""
        reason = self.refusal(str(request.url))
        if reason:
            raise RefusedUrl(f"{request.url}: refused, {reason}")

    def transport(self) -> httpx.HTTPTransport:
        """Connections only to the addresses the rule judged (the list's own origin whatever its address)."""
        return self.hosts.transport()

    def _host_refusal(self, host: str) -> str | None:
        if host not in self._public:  # a name that does not resolve raises, and is asked again next time
            self._public[host] = self.hosts.host_refusal(host)
        return self._public[host]


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of a URL, or None when it cannot be parsed (a port out of range)."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").rstrip("."), parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return None


def _folder_of(path: Path | None) -> Path | None:
    try:
        return path.resolve().parent if path is not None else None
    except (OSError, ValueError):
        return None


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder)
    except (OSError, ValueError):  # a NUL byte, a symlink loop
        return False

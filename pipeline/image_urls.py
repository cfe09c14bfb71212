"""Images given by http(s) URL, fetched into a local folder first.

Every fetch goes through the public-host rule of storage/public_urls.py, one redirect hop at a time
(at most MAX_REDIRECTS), within a size limit and a timeout. `ituning caption URL` fetches what its
own user typed, loopback and private hosts included (`PublicHosts(private_allowed=True)`); the web
page fetches a visitor's URL from public hosts only, unless started with --allow-private-urls.

A failure is an ImageFetchError: `reason` is safe to show to whoever gave the URL ("not a public
address", "timed out", "the server answered HTTP 404", "too large"); its text adds the details for
the command line's own user.
"""

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from storage.public_urls import NotPublicAddress, PublicHosts, UnresolvedHost

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_REDIRECTS = 5
TIMEOUT_S = 30.0


class ImageFetchError(OSError):
    """An image URL that gave no image file: refused, unreachable, an HTTP error, or too large."""

    def __init__(self, url: str, reason: str, detail: str | None = None):
        super().__init__(f"{url}: {detail or reason}")
        self.reason = reason


def is_image_url(text: str) -> bool:
    return urlsplit(text).scheme in ("http", "https")


def local_name(url: str, index: int) -> str:
    """A safe file name for the URL's download that keeps its suffix (PIL reads by content anyway)."""
    name = Path(unquote(urlsplit(url).path)).name or "image"
    return f"{index:04d}-{re.sub(r'[^A-Za-z0-9._-]', '_', name)[-100:]}"


def fetch_image(url: str, target: Path, max_bytes: int = MAX_IMAGE_BYTES, hosts: PublicHosts | None = None) -> Path:
    """Download `url` to `target` through `hosts` (default: any host, for the command line's own
    user); ImageFetchError when it is refused, fails or exceeds max_bytes."""
    hosts = hosts or PublicHosts(private_allowed=True)
    try:
        with httpx.Client(transport=hosts.transport(), timeout=TIMEOUT_S, follow_redirects=False) as client:
            _save(_final_response(client, url), url, target, max_bytes)
    except BaseException as error:
        target.unlink(missing_ok=True)
        if isinstance(error, NotPublicAddress):
            raise ImageFetchError(url, "not a public address", f"refused, {error}") from error
        if isinstance(error, httpx.TimeoutException):
            raise ImageFetchError(url, "timed out", f"timed out ({error})") from error
        if isinstance(error, (httpx.HTTPError, UnresolvedHost)):
            raise ImageFetchError(url, "the connection failed", str(error) or type(error).__name__) from error
        raise
    return target


def _final_response(client: httpx.Client, url: str) -> httpx.Response:
    """The streamed response at the end of the redirects, each hop's URL checked before it is sent."""
    request = client.build_request("GET", url)
    for _ in range(MAX_REDIRECTS + 1):
        if request.url.scheme not in ("http", "https"):
            raise ImageFetchError(url, "not an http(s) URL", f"redirected to {request.url}, not an http(s) URL")
        response = client.send(request, stream=True)
        if not response.is_redirect:
            return response
        response.close()
        request = response.next_request
    raise ImageFetchError(url, "too many redirects", f"more than {MAX_REDIRECTS} redirects")


def _save(response: httpx.Response, url: str, target: Path, max_bytes: int) -> None:
    try:
        _check_answer(response, url, max_bytes)
        received = 0
        with open(target, "wb") as file:
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > max_bytes:
                    raise ImageFetchError(url, "too large", f"over the {max_bytes:,}-byte limit")
                file.write(chunk)
    finally:
        response.close()


def _check_answer(response: httpx.Response, url: str, max_bytes: int) -> None:
    if response.status_code != 200:  # the code only: the reason phrase is the server's text
        raise ImageFetchError(url, f"the server answered HTTP {response.status_code}",
                              f"HTTP {response.status_code} {response.reason_phrase}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageFetchError(url, "too large", f"{int(declared):,} bytes, over the {max_bytes:,}-byte limit")

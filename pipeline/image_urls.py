"""Images given by http(s) URL (`ituning caption https://...`), fetched into a local folder first.

A URL the user typed is fetched as given (loopback and private hosts included, as for a manifest),
following redirects, within a size limit and a timeout; a failure names the URL and the reason.
"""

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

MAX_IMAGE_BYTES = 20 * 1024 * 1024
TIMEOUT_S = 30.0


class ImageFetchError(OSError):
    """An image URL that gave no image file: unreachable, an HTTP error, or too large."""


def is_image_url(text: str) -> bool:
    return urlsplit(text).scheme in ("http", "https")


def local_name(url: str, index: int) -> str:
    """A safe file name for the URL's download that keeps its suffix (PIL reads by content anyway)."""
    name = Path(unquote(urlsplit(url).path)).name or "image"
    return f"{index:04d}-{re.sub(r'[^A-Za-z0-9._-]', '_', name)[-100:]}"


def fetch_image(url: str, target: Path, max_bytes: int = MAX_IMAGE_BYTES) -> Path:
    """Download `url` to `target`; ImageFetchError when it fails or exceeds max_bytes."""
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=TIMEOUT_S) as response:
            if response.status_code != 200:
                raise ImageFetchError(f"{url}: HTTP {response.status_code} {response.reason_phrase}")
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise ImageFetchError(f"{url}: {declared:,} bytes, over the {max_bytes:,}-byte limit")
            received = 0
            with open(target, "wb") as file:
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if received > max_bytes:
                        raise ImageFetchError(f"{url}: over the {max_bytes:,}-byte limit")
                    file.write(chunk)
    except httpx.HTTPError as error:
        raise ImageFetchError(f"{url}: {error}") from error
    except ImageFetchError:
        target.unlink(missing_ok=True)
        raise
    return target

"""Who may use the captioner page's server (`ituning app`), checked before any request reaches it.

- Host: a loopback name (127.0.0.1, localhost), the name given to `--host`, or one named with
  `--allowed-host`; others get 400. A web page under a name of its own that resolves to this machine
  (DNS rebinding) is refused so.
- Origin, when sent: the page's own, the scheme and the Host the request came to; others get 403.
  Browsers send Origin on every POST and on cross-origin reads.
- A request that changes something (POST) must also come
  - from the same origin by the browser's own account: Sec-Fetch-Site, when sent, is `same-origin`
    or `none` (a browser sends it on every request; scripts such as curl send neither it nor Origin,
    and they are not a visitor's browser acting for another site);
  - with the page's own content type, application/json (a URL) or application/octet-stream / image/*
    (the image's bytes); 415 for others. A cross-site form or fetch can send only text/plain,
    multipart/form-data or urlencoded bodies without asking the server first (a CORS preflight,
    which this server never grants).

The loopback names and the Prefect UI's origins are the ones the Prefect server's guard
(flows/server.py) and its launcher (cli/services.py) use too.
"""

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
PAGE_CONTENT_TYPES = ("application/json", "application/octet-stream")
DEFAULT_PORTS = {"http": 80, "https": 443}


def ui_origins(host: str, port: int) -> list[str]:
    """The origins the Prefect UI is opened from: the server's own address under each loopback name."""
    return [f"http://{name}:{port}" for name in dict.fromkeys((host, *LOOPBACK_NAMES))]


def host_name(host_header: str) -> str:
    """The name in a Host header: localhost:4200 -> localhost, [::1]:4200 -> [::1]."""
    name = host_header.strip().lower()
    return name[: name.find("]") + 1] if name.startswith("[") else name.split(":")[0]


def is_own_origin(origin: str, host_header: str) -> bool:
    """Whether `origin` is the origin of a page served under `host_header`, in either scheme."""
    try:
        parts, served = urlsplit(origin.lower()), urlsplit(f"//{host_header.strip().lower()}")
        if parts.scheme not in DEFAULT_PORTS or parts.path not in ("", "/"):
            return False
        default = DEFAULT_PORTS[parts.scheme]
        return (parts.hostname, parts.port or default) == (served.hostname, served.port or default)
    except ValueError:  # a port out of range
        return False


class PageGuard:
    """The checks above as ASGI middleware (`app.add_middleware(PageGuard, hosts=[...])`)."""

    def __init__(self, app: ASGIApp, hosts: list[str]):
        self.app = app
        self.hosts = {name.lower() for name in (*LOOPBACK_NAMES, *hosts)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope["method"], Headers(scope=scope)) if scope["type"] == "http" else None
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message = refusal
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)

    def refusal(self, method: str, headers: Headers) -> tuple[int, str] | None:
        host, origin = headers.get("host", ""), headers.get("origin")
        if host_name(host) not in self.hosts:
            return 400, "Invalid host header: start the app with --allowed-host NAME to answer that name"
        if origin is not None and not is_own_origin(origin, host):
            return 403, "requests from another site are not allowed"
        if method in SAFE_METHODS:
            return None
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return 403, "requests from another site are not allowed"
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in PAGE_CONTENT_TYPES and not content_type.startswith("image/"):
            return 415, "send an image as application/octet-stream (or image/*) or a URL as application/json"
        return None

"""The Prefect server as `ituning serve` runs it: Prefect's own app (API and UI) behind a check of who asks.

`prefect server start` answers any Host header and, by default, any origin: a web page open in the
user's browser could read the API and start deployments, from its own origin (CORS allows `*`) or
under a host name of its own that resolves to 127.0.0.1 (DNS rebinding). Run as
`python -m flows.server --host 127.0.0.1 --port 4200`, the same app answers only
- requests whose Host is a loopback name (127.0.0.1, localhost, the host it listens on); others get 400;
- requests without an Origin or from the UI's own (http://127.0.0.1:PORT, http://localhost:PORT) or another
  origin named in PREFECT_SERVER_CORS_ALLOWED_ORIGINS ("*" there is ignored); others get 403, websocket
  handshakes included (CORS does not cover websockets).
Browsers send Origin on cross-origin requests; Prefect's client, worker and CLI send none.
cli/services.py also turns on Prefect's CSRF protection, which its client and UI support.
"""

import argparse

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.page_guard import LOOPBACK_NAMES, host_name, ui_origins


class LoopbackGuard:
    """Passes on requests to a loopback host name that carry no Origin or an allowed one; refuses the rest,
    an HTTP request with 400 (host) or 403 (origin), a websocket handshake with 403."""

    def __init__(self, app: ASGIApp, hosts: list[str], origins: list[str]):
        self.app = app
        self.hosts = {name.lower() for name in hosts}
        self.origins = {origin.rstrip("/") for origin in origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if host_name(headers.get("host", "")) not in self.hosts:
            status, reason = 400, "Invalid host header"
        elif origin is not None and origin.rstrip("/") not in self.origins:
            status, reason = 403, f"Origin {origin} is not allowed"
        else:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # closing before the handshake answers 403
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
        else:
            await PlainTextResponse(reason, status_code=status)(scope, receive, send)


def guarded(app: ASGIApp, host: str, allowed_origins: list[str]) -> ASGIApp:
    """`app` answering loopback host names and the allowed origins only."""
    return LoopbackGuard(app, hosts=[host, *LOOPBACK_NAMES], origins=allowed_origins)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)

    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import get_current_settings

    server = get_current_settings().server
    # The app `prefect server start` runs; the server's own in-process clients call it unguarded.
    app = create_app(final=True)
    configured = [origin.strip() for origin in server.api.cors_allowed_origins.split(",")]
    origins = ui_origins(args.host, args.port) + [origin for origin in configured if origin not in ("", "*")]
    uvicorn.run(guarded(app, args.host, origins), host=args.host, port=args.port,
                timeout_keep_alive=server.api.keepalive_timeout, ws_ping_interval=server.api.websocket_ping_interval,
                ws_ping_timeout=server.api.websocket_ping_timeout, log_level=server.logging_level.lower())


if __name__ == "__main__":
    main()

"""Who the Prefect server of `ituning serve` answers (cli/services.py, flows/server.py).

A web page open in the user's browser must not read the API or start deployments: not from its own
origin (CORS, CSRF), not under a host name of its own that resolves to 127.0.0.1 (DNS rebinding), not
over a websocket. The UI, the Prefect client, `prefect deploy` and the work pool still work."""

import http.client
import json
import uuid

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

EVIL = "http://evil.example"


def request(port: int, method: str, path: str, headers: dict, body: str | None = None):
    """(status, lower-cased headers, body) for a request with exactly these Host/Origin headers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        data = body.encode() if body is not None else None
        if data is not None:
            connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def deployment_id(settings) -> str:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api=settings.prefect_api_url) as client:
        return str(client.read_deployment_by_name("retrain/retrain-weekly").id)


@pytest.mark.slow
def test_only_loopback_host_names_are_answered(prefect_service):
    port = prefect_service.prefect_port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, _, body = request(port, "GET", "/api/health", {"Host": host})
        assert (status, body) == (200, b"true"), host
    status, headers, ui = request(port, "GET", "/", {"Host": f"localhost:{port}"})
    assert status == 200 and headers["content-type"].startswith("text/html")
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        status, _, _ = request(port, "GET", "/api/health", {"Host": host})
        assert status in (400, 421), host
    status, _, _ = request(port, "POST", f"/api/deployments/{deployment_id(prefect_service)}/create_flow_run",
                           {"Host": f"evil.example:{port}", "Content-Type": "application/json"}, "{}")
    assert status in (400, 421)


@pytest.mark.slow
def test_a_foreign_origin_can_neither_read_nor_start_a_deployment(prefect_service):
    port = prefect_service.prefect_port
    here = f"127.0.0.1:{port}"
    status, headers, _ = request(port, "GET", "/api/health", {"Host": here, "Origin": EVIL})
    assert headers.get("access-control-allow-origin") not in ("*", EVIL) and status == 403
    preflight = {"Host": here, "Origin": EVIL, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    status, headers, _ = request(port, "OPTIONS", "/api/flow_runs/filter", preflight)
    assert headers.get("access-control-allow-origin") not in ("*", EVIL) and status >= 400
    # a "simple" cross-origin POST: sent by a browser without a preflight
    start = f"/api/deployments/{deployment_id(prefect_service)}/create_flow_run"
    status, _, body = request(port, "POST", start, {"Host": here, "Origin": EVIL, "Content-Type": "text/plain"}, "")
    assert status == 403, body
    # without an Origin (not a browser) but without Prefect's CSRF token either
    status, _, body = request(port, "POST", start, {"Host": here, "Content-Type": "application/json"}, "{}")
    assert status == 403 and b"CSRF" in body


@pytest.mark.slow
def test_a_foreign_origin_cannot_open_the_event_websocket(prefect_service):
    port = prefect_service.prefect_port
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}/api/events/out", origin=EVIL, open_timeout=30).close()
    assert refused.value.response.status_code == 403
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", None):
        connect(f"ws://127.0.0.1:{port}/api/events/out", origin=origin, open_timeout=30).close()


@pytest.mark.slow
def test_the_ui_origin_and_the_prefect_client_still_work(prefect_service):
    from prefect.client.orchestration import SyncPrefectClient

    port = prefect_service.prefect_port
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        here = {"Host": f"127.0.0.1:{port}", "Origin": origin}
        client_id = str(uuid.uuid4())  # the UI's way: a CSRF token for its client id, then the request
        status, _, token = request(port, "GET", f"/api/csrf-token?client={client_id}", here)
        assert status == 200
        status, headers, body = request(
            port, "POST", "/api/deployments/filter",
            {**here, "Content-Type": "application/json", "Prefect-Csrf-Token": json.loads(token)["token"],
             "Prefect-Csrf-Client": client_id}, "{}")
        assert status == 200 and headers["access-control-allow-origin"] == origin
        assert [d["name"] for d in json.loads(body)] == ["retrain-weekly"]
    with SyncPrefectClient(api=prefect_service.prefect_api_url) as client:
        run = client.create_flow_run_from_deployment(deployment_id(prefect_service))
        assert client.read_flow_run(run.id).deployment_id is not None


def test_the_guard_refuses_before_the_app_sees_the_request():
    import asyncio

    from flows.server import guarded

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(headers: dict) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": "/api/health", "query_string": b"", "root_path": "",
                 "scheme": "http", "server": ("127.0.0.1", 4200), "http_version": "1.1",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        await guarded(app, "127.0.0.1", ["http://127.0.0.1:4200"])(scope, receive, send)
        return sent[0]["status"]

    assert asyncio.run(call({"Host": "127.0.0.1:4200"})) == 200
    assert asyncio.run(call({"Host": "localhost:4200", "Origin": "http://127.0.0.1:4200"})) == 200
    assert asyncio.run(call({"Host": "evil.example:4200"})) == 400
    assert asyncio.run(call({"Host": "localhost:4200", "Origin": EVIL})) == 403
    assert asyncio.run(call({"Host": "localhost:4200", "Origin": "null"})) == 403
    assert seen == ["/api/health", "/api/health"]

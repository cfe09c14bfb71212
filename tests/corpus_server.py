"""An HTTP file server on 127.0.0.1 that honours Range requests and injects faults on demand."""

import threading
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class CorpusServer(ThreadingHTTPServer):
    """Serves `folder`. `faults[path]` is a queue of one-shot faults for that file:
    "404", "500", "corrupt" (one byte flipped) or "cut:N" (the body stops after N bytes)."""

    daemon_threads = True

    def __init__(self, folder: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder = Path(folder)
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.bytes_sent: Counter = Counter()
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    def next_fault(self, relative: str) -> str | None:
        with self._lock:
            queue = self.faults.get(relative)
            return queue.pop(0) if queue else None

    def count(self, relative: str, range_header: str | None, sent: int) -> None:
        with self._lock:
            self.requests.append((relative, range_header))
            self.bytes_sent[relative] += sent


class _Handler(BaseHTTPRequestHandler):
    server: CorpusServer

    def do_GET(self):
        relative = unquote(urlparse(self.path).path).lstrip("/")
        fault, path = self.server.next_fault(relative), self.server.folder / relative
        range_header = self.headers.get("Range")
        if fault in ("404", "500") or not path.is_file():
            self.server.count(relative, range_header, 0)
            return self.send_error(500 if fault == "500" else 404)
        data = bytearray(path.read_bytes())
        if fault == "corrupt":
            data[len(data) // 2] ^= 0xFF
        start = int(range_header.removeprefix("bytes=").split("-")[0]) if range_header else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = bytes(data[start:])
        if fault and fault.startswith("cut:"):
            body, self.close_connection = body[: int(fault[4:])], True
        self.wfile.write(body)
        self.wfile.flush()
        self.server.count(relative, range_header, len(body))

    def log_message(self, *args):
        pass

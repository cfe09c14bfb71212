"""An HTTP file server on 127.0.0.1 that honours Range requests and injects faults on demand."""

import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class CorpusServer(ThreadingHTTPServer):
    """Serves `folder`. `faults[path]` is a queue of one-shot faults for that file:
    "404", "500", "corrupt" (one byte flipped), "cut:N" (the body stops after N bytes),
    "stall:S" (S seconds of silence before answering) or "ignore-range" (a 200 with the whole file)."""

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

    def note_request(self, relative: str, range_header: str | None) -> None:
        with self._lock:
            self.requests.append((relative, range_header))

    def note_sent(self, relative: str, sent: int) -> None:
        with self._lock:
            self.bytes_sent[relative] += sent

    def handle_error(self, request, client_address):
        pass  # clients that gave up (timeouts) close their end; nothing to report


class _Handler(BaseHTTPRequestHandler):
    server: CorpusServer

    def do_GET(self):
        relative = unquote(urlparse(self.path).path).lstrip("/")
        fault, path = self.server.next_fault(relative), self.server.folder / relative
        range_header = self.headers.get("Range")
        self.server.note_request(relative, range_header)
        if fault and fault.startswith("stall:"):
            time.sleep(float(fault[6:]))
        if fault in ("404", "500") or not path.is_file():
            return self.send_error(500 if fault == "500" else 404)
        data = bytearray(path.read_bytes())
        if fault == "corrupt":
            data[len(data) // 2] ^= 0xFF
        start = int(range_header.removeprefix("bytes=").split("-")[0]) if range_header and fault != "ignore-range" else 0
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
        self.server.note_sent(relative, len(body))

    def log_message(self, *args):
        pass

"""An image list is a downloaded file: the URLs it names may not reach local files, loopback, private
or link-local hosts (redirects included), except the image list's own origin that the user's manifest named."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from storage.acquire import download_dataset
from storage.downloads import DownloadError, RetryPolicy
from storage.listed_urls import ListedUrls
from storage.manifests import ImageList, Manifest, RemoteFile
from tests.corpus_server import CorpusServer

QUICK = RetryPolicy(attempts=2, first_wait_s=0.01, max_wait_s=0.05)
PUBLIC = "93.184.215.14"  # a global unicast address; nothing is fetched from it


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/a.jpg", "http://127.1/a.jpg", "http://2130706433/a.jpg", "http://[::1]/a.jpg",
    "http://0.0.0.0/a.jpg", "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/a.jpg",
    "http://192.168.0.7/a.jpg", "https://172.16.4.4/a.jpg", "http://100.64.0.1/a.jpg",
    "http://[::ffff:127.0.0.1]/a.jpg", "http://[fe80::1]/a.jpg", "http://224.0.0.1/a.jpg",
    "http://localhost/a.jpg", "http://images.localhost./a.jpg", "HTTP://LOCALHOST:80/a.jpg",
    "ftp://example.org/a.jpg", "gopher://example.org/", "data:image/png;base64,AAAA", "http:///a.jpg",
    "http://example.org:99999/a.jpg", "/etc/hostname", "file:///etc/hostname", "a.jpg", "C:\\images\\a.jpg",
])
def test_downloaded_list_may_not_name_local_or_non_public_places(url):
    rule = ListedUrls(f"https://{PUBLIC}/nocaps_val_image_info.json")
    assert rule.refusal(url), url


def test_public_hosts_and_the_lists_own_origin_are_allowed():
    rule = ListedUrls("http://127.0.0.1:8000/nocaps/nocaps_val_image_info.json")
    assert rule.refusal(f"https://{PUBLIC}/val/a.jpg") is None
    assert rule.refusal("http://127.0.0.1:8000/nocaps/val/a.jpg") is None
    assert rule.refusal("http://127.0.0.1:8001/nocaps/val/a.jpg")  # another port: another service
    assert rule.refusal("https://127.0.0.1:8000/nocaps/val/a.jpg")
    assert ListedUrls(None).refusal("http://127.0.0.1:8000/a.jpg")  # a list not from the manifest


def test_a_local_list_may_name_files_in_its_own_folder_only(tmp_path):
    (tmp_path / "corpus" / "val").mkdir(parents=True)
    (tmp_path / "corpus" / "val" / "a.jpg").write_bytes(b"a")
    (tmp_path / "corpus-secret").mkdir()
    (tmp_path / "corpus" / "link").symlink_to(tmp_path / "corpus-secret")
    rule = ListedUrls(str(tmp_path / "corpus" / "info.json"))
    assert rule.refusal(str(tmp_path / "corpus" / "val" / "a.jpg")) is None
    assert rule.refusal((tmp_path / "corpus" / "val" / "a.jpg").as_uri()) is None
    for outside in (tmp_path / "secret.txt", tmp_path / "corpus" / ".." / "secret.txt",
                    tmp_path / "corpus" / "link" / "key", Path("/etc/hostname")):
        assert rule.refusal(str(outside)), outside
        assert rule.refusal(outside.as_uri() if outside.is_absolute() else str(outside)), outside
    assert rule.refusal("http://127.0.0.1:8000/a.jpg")


def test_host_names_are_judged_by_their_addresses(monkeypatch):
    real = socket.getaddrinfo
    answers = {"intranet.example": "10.0.0.5", "metadata.example": "169.254.169.254", "cdn.example": PUBLIC}

    def getaddrinfo(host, *args, **kwargs):
        if host in answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], 0))]
        if host == "nowhere.example":
            raise socket.gaierror(-2, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    rule = ListedUrls(f"https://{PUBLIC}/info.json")
    assert "10.0.0.5" in rule.refusal("https://intranet.example/a.jpg")
    assert "169.254.169.254" in rule.refusal("http://metadata.example/a.jpg")
    assert rule.refusal("https://cdn.example/a.jpg") is None
    with pytest.raises(DownloadError, match="cannot resolve nowhere.example"):
        rule.refusal("https://nowhere.example/a.jpg")


class _Redirecting(BaseHTTPRequestHandler):
    """Answers /moved.jpg with a redirect to `target`, other paths from `files`."""

    files: dict[str, bytes] = {}
    target = ""

    def do_GET(self):
        if self.path == "/moved.jpg":
            self.send_response(302)
            self.send_header("Location", self.target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.files.get(self.path.lstrip("/"))
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def internal(tmp_path):
    """A service on loopback that no downloaded list may reach, holding a secret."""
    (tmp_path / "internal").mkdir()
    (tmp_path / "internal" / "secret.txt").write_text("internal secret")
    with CorpusServer(tmp_path / "internal") as server:
        yield server


def _info(entries: list[tuple[str, str]]) -> bytes:
    return json.dumps({"images": [{"id": number, "file_name": name, "coco_url": url}
                                  for number, (name, url) in enumerate(entries)]}).encode()


def _fetched(root: Path) -> dict[str, bytes]:
    folder = root / "data" / "nocaps" / "val"
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.suffix == ".jpg"}


def test_a_served_list_reaches_neither_local_files_nor_other_loopback_services(tmp_path, internal):
    secret = tmp_path / "secret.txt"
    secret.write_text("local secret")
    handler = type("Handler", (_Redirecting,), {"target": f"{internal.url}/secret.txt", "files": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    handler.files.update({"good.jpg": b"a good image", "info.json": _info([
        ("good.jpg", f"{origin}/good.jpg"), ("path.jpg", str(secret)), ("file.jpg", secret.as_uri()),
        ("loopback.jpg", f"{internal.url}/secret.txt"), ("moved.jpg", f"{origin}/moved.jpg"),
        ("metadata.jpg", "http://169.254.169.254/latest/meta-data/")])})
    manifest = Manifest("nocaps", (RemoteFile("info.json", f"{origin}/info.json"),), (ImageList("info.json", "val"),))
    try:
        report = download_dataset(manifest, tmp_path / "ws", QUICK, concurrency=2, timeout_s=5)
    finally:
        server.shutdown()
        server.server_close()
    assert _fetched(tmp_path / "ws") == {"good.jpg": b"a good image"}
    assert internal.requests == []
    assert report.images == 1 and len(report.failures) == 5, report.failures
    for number in (1, 2, 3, 5):  # path, file, loopback, metadata
        assert any(f"info.json: images[{number}].coco_url" in failure and "refused" in failure
                   for failure in report.failures), (number, report.failures)
    assert any(f"{internal.url}/secret.txt: refused" in failure for failure in report.failures)  # the redirect
    verified = json.loads((tmp_path / "ws" / "data" / "nocaps" / "val" / "verified.json").read_text())
    assert set(verified) == {"val/good.jpg"}


def test_a_local_list_through_the_command(tmp_path, internal):
    """A manifest naming a local image list (the synthetic corpus's way): its own folder is fetched,
    nothing outside it; the refused images are error lines and the command exits 1."""
    corpus = tmp_path / "corpus"
    (corpus / "val").mkdir(parents=True)
    (corpus / "val" / "good.jpg").write_bytes(b"a good image")
    secret = tmp_path / "secret.txt"
    secret.write_text("local secret")
    (corpus / "info.json").write_bytes(_info([
        ("good.jpg", str(corpus / "val" / "good.jpg")), ("path.jpg", str(secret)),
        ("up.jpg", str(corpus / ".." / "secret.txt")), ("file.jpg", "file:///etc/hostname"),
        ("loopback.jpg", f"{internal.url}/secret.txt")]))
    manifest = tmp_path / "nocaps.json"
    files = [{"name": "info.json", "url": str(corpus / "info.json")}]
    manifest.write_text(json.dumps({"dataset": "nocaps", "files": files,
                                    "image_lists": [{"info": "info.json", "into": "val"}]}))
    result = CliRunner().invoke(app, ["download", "nocaps", "--manifest", str(manifest), "--no-progress",
                                      "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 1, result.output
    errors = result.stderr.splitlines()
    assert len(errors) == 4 and all(line.startswith("error: info.json: images[") for line in errors), errors
    assert all("refused: a local file outside" in line for line in errors[:3]), errors
    assert "refused: 127.0.0.1 is not a public address" in errors[3], errors
    assert _fetched(tmp_path / "ws") == {"good.jpg": b"a good image"} and internal.requests == []

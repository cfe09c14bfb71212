"""A Hugging Face Hub on loopback: model repositories kept in local folders, served with the hub's own
HTTP protocol, so that huggingface_hub, transformers and open_clip download them exactly as they do
from huggingface.co. Point a process at it with HF_ENDPOINT=server.endpoint (read at import).

What huggingface_hub 2.4 asks for (`hf_hub_download`, `snapshot_download`, and through them
transformers' `from_pretrained` and open_clip), and what it gets here:

    HEAD|GET /{repo}/resolve/{revision}/{path}
        a file kept in git: 200, ETag = its git blob id, X-Repo-Commit, Content-Length (GET: the bytes)
        an LFS file (weights): 302 to the CDN, X-Linked-Etag = its sha256, X-Linked-Size, X-Repo-Commit
        a missing file: 404, X-Error-Code EntryNotFound (with X-Repo-Commit, so the client caches the miss)
    GET /api/models/{repo}[/revision/{revision}]    repo info: sha (the commit) and siblings
    GET /api/models/{repo}/tree/{revision}[/{path}] the file listing (`recursive`), LFS sizes and sha256
    a renamed repo (gpt2 -> openai-community/gpt2): 307 to the new name, as the hub answers
    an unknown repo or revision: 404 with X-Error-Code RepoNotFound / RevisionNotFound
    anything else (the client's best-effort extras): a plain 404

The CDN is a second listener on its own port: a different origin, as the real one is, so the client
stops at the 302 and reads the file's metadata from it. Files with a weights suffix (.safetensors,
.bin, ...) are LFS files, as the hub's default .gitattributes makes them; the rest are served from the
repo itself. `requests` logs every request.
"""

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".h5", ".msgpack")
MAIN = "main"
CHUNK = 1 << 20


@dataclass(frozen=True)
class RepoFile:
    path: str  # inside the repo, with /
    location: Path
    size: int
    blob_id: str  # git blob sha1 of what git stores: the file, or its LFS pointer
    sha256: str | None  # LFS files only

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """What git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def describe_file(path: str, location: Path) -> RepoFile:
    size = location.stat().st_size
    if not path.endswith(LFS_SUFFIXES):
        return RepoFile(path, location, size, git_blob_id(location.read_bytes()), None)
    digest = hashlib.sha256()
    with location.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return RepoFile(path, location, size, git_blob_id(lfs_pointer(digest.hexdigest(), size)), digest.hexdigest())


@dataclass(frozen=True)
class Repo:
    repo_id: str
    files: dict[str, RepoFile]
    commit: str  # 40 hex digits, derived from the content

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path) -> "Repo":
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        files = {p.relative_to(folder).as_posix(): describe_file(p.relative_to(folder).as_posix(), p) for p in paths}
        listing = "".join(f"{f.path} {f.blob_id}\n" for f in files.values())
        return cls(repo_id, files, hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest())

    def folders(self) -> set[str]:
        return {"/".join(path.split("/")[:depth]) for path in self.files for depth in range(1, path.count("/") + 1)}


class HubServer:
    """`with HubServer() as hub: hub.add_repo("org/name", folder)`; `hub.endpoint` is the HF_ENDPOINT."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.renamed: dict[str, str] = {}  # old repo id -> current one
        self.requests: list[tuple[str, str, str]] = []  # (hub|cdn, method, path with query)
        self._lock = threading.Lock()
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), type(handler.__name__, (handler,), {"hub": self}))
                         for handler in (_HubHandler, _CdnHandler)]  # the hub, then its CDN

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def add_repo(self, repo_id: str, folder: str | Path, renamed_from: tuple[str, ...] = ()) -> Repo:
        repo = Repo.from_folder(repo_id, Path(folder))
        with self._lock:
            self.repos[repo_id] = repo
            self.renamed.update({old: repo_id for old in renamed_from})
        return repo

    def log(self, role: str, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((role, method, path))

    def take_requests(self) -> list[tuple[str, str, str]]:
        with self._lock:
            taken, self.requests = self.requests, []
        return taken

    def blob(self, sha256: str) -> RepoFile | None:
        return next((f for repo in list(self.repos.values()) for f in repo.files.values() if f.sha256 == sha256), None)

    def __enter__(self) -> "HubServer":
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer
    role = ""

    def do_HEAD(self):
        self.hub.log(self.role, "HEAD", self.path)
        self.answer(head=True)

    def do_GET(self):
        self.hub.log(self.role, "GET", self.path)
        self.answer(head=False)

    def answer(self, head: bool) -> None:
        """Each server's own answer: the hub's API and resolve routes, or the CDN's file bytes."""
        raise NotImplementedError  # the hub and CDN handlers below define it

    def send(self, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_json(self, data, head: bool, headers: dict | None = None) -> None:
        self.send(200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
                  json.dumps(data).encode(), head)

    def send_error_code(self, status: int, code: str, message: str, head: bool, headers: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send(status, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message,
                           **(headers or {})}, body, head)

    def send_file(self, file: RepoFile, headers: dict, head: bool) -> None:
        """The file's bytes; a `Range: bytes=a-b` request (a resumed download) gets 206 and that slice."""
        start, end = 0, file.size - 1
        byte_range = self.headers.get("Range", "")
        if byte_range.startswith("bytes=") and "," not in byte_range:
            first, _, last = byte_range[len("bytes="):].partition("-")
            if first:
                start, end = int(first), min(int(last), end) if last else end
            else:  # bytes=-n: the last n bytes
                start = max(file.size - int(last), 0)
        partial = (start, end) != (0, file.size - 1)
        self.send_response(206 if partial else 200)
        for name, value in {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                            "Content-Length": str(end - start + 1)}.items():
            self.send_header(name, value)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{file.size}")
        self.end_headers()
        if head:
            return
        with file.location.open("rb") as stream:
            stream.seek(start)
            remaining = end - start + 1
            while remaining > 0 and (chunk := stream.read(min(CHUNK, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def log_message(self, format, *args):  # the request log is `hub.requests`
        pass


class _CdnHandler(_Handler):
    role = "cdn"

    def answer(self, head: bool) -> None:
        file = self.hub.blob(urlsplit(self.path).path.strip("/"))
        if file is None:
            self.send(404, {"Content-Type": "text/plain"}, b"Not Found", head)
        else:
            self.send_file(file, {"ETag": f'"{file.sha256}"'}, head)


class _HubHandler(_Handler):
    role = "hub"

    def answer(self, head: bool) -> None:
        url = urlsplit(self.path)
        if url.path.startswith("/api/models/"):
            self.api(url.path[len("/api/models/"):], parse_qs(url.query), head)
        elif "/resolve/" in url.path:
            repo_id, _, rest = url.path.strip("/").partition("/resolve/")
            revision, _, filename = rest.partition("/")
            self.resolve(repo_id, unquote(revision), unquote(filename), head)
        else:
            self.send(404, {"Content-Type": "text/plain"}, b"Not Found", head)

    def find_repo(self, repo_id: str, head: bool) -> Repo | None:
        """The repo, or None once a redirect (renamed repo) or a 404 has been answered."""
        if repo_id in self.hub.renamed:
            moved = f"{self.path}/".replace(f"/{repo_id}/", f"/{self.hub.renamed[repo_id]}/", 1)[:-1]
            self.send(307, {"Location": moved}, b"", head)
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self.send_error_code(404, "RepoNotFound", "Repository not found", head)
        return repo

    def find_revision(self, repo: Repo, revision: str, head: bool) -> bool:
        if revision in (MAIN, repo.commit):
            return True
        self.send_error_code(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return False

    def resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self.find_repo(repo_id, head)
        if repo is None or not self.find_revision(repo, revision, head):
            return
        commit = {"X-Repo-Commit": repo.commit}
        file = repo.files.get(filename)
        if file is None:
            self.send_error_code(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"", head, commit)
        elif file.sha256 is None:
            self.send_file(file, {**commit, "ETag": f'"{file.blob_id}"'}, head)
        else:
            location = f"{self.hub.cdn}/{file.sha256}?filename={quote(filename.split('/')[-1])}"
            body = f"Found. Redirecting to {location}".encode()
            self.send(302, {**commit, "Location": location, "ETag": f'"{file.blob_id}"',
                            "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size),
                            "Content-Type": "text/plain; charset=utf-8"}, body, head)

    def api(self, rest: str, query: dict, head: bool) -> None:
        for marker, action in (("/revision/", self.repo_info), ("/tree/", self.tree)):
            if marker in rest:
                repo_id, _, tail = rest.partition(marker)
                revision, _, subpath = tail.partition("/")
                return action(repo_id, unquote(revision), unquote(subpath), query, head)
        return self.repo_info(rest.strip("/"), MAIN, "", query, head)

    def repo_info(self, repo_id: str, revision: str, _subpath: str, _query: dict, head: bool) -> None:
        repo = self.find_repo(repo_id, head)
        if repo is None or not self.find_revision(repo, revision, head):
            return
        self.send_json({
            "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": repo.commit, "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": [{"rfilename": path} for path in repo.files],
        }, head)

    def tree(self, repo_id: str, revision: str, subpath: str, query: dict, head: bool) -> None:
        repo = self.find_repo(repo_id, head)
        if repo is None or not self.find_revision(repo, revision, head):
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{subpath.strip('/')}/" if subpath.strip("/") else ""
        if prefix and prefix[:-1] not in repo.folders():
            self.send_error_code(404, "EntryNotFound", f"{subpath} does not exist on \"{revision}\"", head)
            return
        entries = [{"type": "directory", "oid": git_blob_id(path.encode()), "size": 0, "path": path}
                   for path in sorted(repo.folders())]
        entries += [_file_entry(file) for file in repo.files.values()]
        inside = [e for e in entries if e["path"].startswith(prefix)
                  and (recursive or "/" not in e["path"][len(prefix):])]
        self.send_json(inside, head)


def _file_entry(file: RepoFile) -> dict:
    entry = {"type": "file", "oid": file.blob_id, "size": file.size, "path": file.path}
    if file.sha256 is not None:
        entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": len(file.pointer)}
    return entry


def hub_environment(endpoint: str, hf_home: Path, offline: bool = False) -> dict[str, str]:
    """This process's environment for a child process whose hub is `endpoint` and whose cache is under
    `hf_home`, every other Hugging Face setting dropped; `offline` adds HF_HUB_OFFLINE=1."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    environment.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home))
    return {**environment, "HF_HUB_OFFLINE": "1"} if offline else environment

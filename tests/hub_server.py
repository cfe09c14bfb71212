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
    a private repo asked for without a token: 401 with X-Error-Code RepoNotFound
    anything else (the client's best-effort extras): a plain 404

And what `HfApi.create_repo`, `create_branch`, `upload_folder` and `update_repo_settings` send (each needs a token:
`Authorization: Bearer ...`, any value; without one, 401):

    POST /api/repos/create                         {name, organization, visibility}: 200 {url}, or 409 {url}
                                                   when it exists; no organization: the user's namespace
    POST /api/models/{repo}/branch/{branch}        a branch from main (or startingPoint); 409 when it exists
    POST /api/validate-yaml                        a README.md's front matter: 400 unless it parses as YAML
    POST /api/models/{repo}/preupload/{revision}   per file: uploadMode lfs (weights suffix) or regular,
                                                   and the oid of the file already there
    POST /{repo}.git/info/lfs/objects/batch        per LFS object: an upload URL on the CDN, or no action
                                                   when the hub holds the bytes already
    PUT  {cdn}/upload/{sha256}                     the bytes (checked against the announced sha256 and size)
    POST /api/models/{repo}/commit/{revision}      NDJSON: header, file (base64), lfsFile, deletedFile,
                                                   deletedFolder; a new commit that the download routes serve
    PUT  /api/models/{repo}/settings               `update_repo_settings`: {visibility: public|private}
                                                   and/or {gated: auto|manual|false}; 200, 400 for others

A client with hf_xet installed uploads through Xet storage, which this hub does not speak: such a client
sets HF_HUB_DISABLE_XET=1 (`hub_environment` does) and uploads by LFS, as without hf_xet.

The CDN is a second listener on its own port: a different origin, as the real one is, so the client
stops at the 302 and reads the file's metadata from it. Files with a weights suffix (.safetensors,
.bin, ...) are LFS files, as the hub's default .gitattributes makes them; the rest are served from the
repo itself. Uploaded files are kept in a temporary folder, removed when the server stops; every
commit stays readable by its id. `requests` logs every request.
"""

import base64
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".h5", ".msgpack")
MAIN = "main"
CHUNK = 1 << 20
LFS_BATCH = ".git/info/lfs/objects/batch"


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
        return cls.of_files(repo_id, [describe_file(p.relative_to(folder).as_posix(), p) for p in paths])

    @classmethod
    def of_files(cls, repo_id: str, files, history: str = "") -> "Repo":
        """A commit of these files; `history` (the parent commit and message) tells apart two commits
        of the same files."""
        files = {file.path: file for file in sorted(files, key=lambda file: file.path)}
        listing = "".join(f"{f.path} {f.blob_id}\n" for f in files.values())
        return cls(repo_id, files, hashlib.sha1(f"{repo_id}\n{history}{listing}".encode()).hexdigest())

    def folders(self) -> set[str]:
        return {"/".join(path.split("/")[:depth]) for path in self.files for depth in range(1, path.count("/") + 1)}


class HubServer:
    """`with HubServer() as hub: hub.add_repo("org/name", folder)`; `hub.endpoint` is the HF_ENDPOINT."""

    def __init__(self, user: str = "user"):
        self.user = user  # whose namespace a repo created without an organization is in
        self.repos: dict[str, Repo] = {}  # repo id -> the head of main
        self.branches: dict[str, dict[str, Repo]] = {}  # repo id -> {other branch: its head}
        self.commits: dict[str, dict[str, Repo]] = {}  # repo id -> {commit id: that commit}, every one kept
        self.private: set[str] = set()
        self.renamed: dict[str, str] = {}  # old repo id -> current one
        self.requests: list[tuple[str, str, str]] = []  # (hub|cdn, method, path with query)
        self.storage = Path(tempfile.mkdtemp(prefix="loopback-hub-"))  # uploaded bytes, by content
        self.announced: dict[str, int] = {}  # sha256 -> size of an LFS upload the CDN will take
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
            self._set_head(repo_id, MAIN, repo)
            self.renamed.update({old: repo_id for old in renamed_from})
        return repo

    def set_head(self, repo_id: str, branch: str, repo: Repo) -> None:
        """Make `repo` the head of `branch`: a commit to it, or the branch's creation."""
        with self._lock:
            self._set_head(repo_id, branch, repo)

    def _set_head(self, repo_id: str, branch: str, repo: Repo) -> None:
        if branch == MAIN:
            self.repos[repo_id] = repo
        else:
            self.branches.setdefault(repo_id, {})[branch] = repo
        self.commits.setdefault(repo_id, {})[repo.commit] = repo

    def create_repo(self, repo_id: str, private: bool) -> bool:
        """An empty repo with a main branch; False when the id is taken."""
        with self._lock:
            if repo_id in self.repos:
                return False
            self._set_head(repo_id, MAIN, Repo.of_files(repo_id, []))
            if private:
                self.private.add(repo_id)
            return True

    def set_private(self, repo_id: str, private: bool) -> None:
        with self._lock:
            (self.private.add if private else self.private.discard)(repo_id)

    def at_revision(self, repo_id: str, revision: str) -> Repo | None:
        """The repo at a branch or a commit id; None when it has no such revision."""
        with self._lock:
            if revision == MAIN:
                return self.repos.get(repo_id)
            return self.branches.get(repo_id, {}).get(revision) or self.commits.get(repo_id, {}).get(revision)

    def keep(self, data: bytes) -> Path:
        """Store uploaded bytes under their sha256; their path."""
        location = self.storage / "blobs" / hashlib.sha256(data).hexdigest()
        location.parent.mkdir(exist_ok=True)
        location.write_bytes(data)
        return location

    def lfs_object(self, sha256: str) -> Path | None:
        """Where the bytes of an LFS object are: uploaded to the CDN, or a file of some commit."""
        uploaded = self.storage / "blobs" / sha256
        known = None if uploaded.is_file() else self.blob(sha256)
        return uploaded if uploaded.is_file() else known.location if known else None

    def log(self, role: str, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((role, method, path))

    def take_requests(self) -> list[tuple[str, str, str]]:
        with self._lock:
            taken, self.requests = self.requests, []
        return taken

    def blob(self, sha256: str) -> RepoFile | None:
        """An LFS file of any commit of any repo, by its sha256."""
        with self._lock:
            every_commit = [repo for commits in self.commits.values() for repo in commits.values()]
        return next((f for repo in every_commit for f in repo.files.values() if f.sha256 == sha256), None)

    def __enter__(self) -> "HubServer":
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        shutil.rmtree(self.storage, ignore_errors=True)


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

    def do_POST(self):
        self.hub.log(self.role, "POST", self.path)
        self.receive(self.read_body())

    def do_PUT(self):
        self.hub.log(self.role, "PUT", self.path)
        self.receive(self.read_body())

    def answer(self, head: bool) -> None:
        """Each server's own answer: the hub's API and resolve routes, or the CDN's file bytes."""
        raise NotImplementedError  # the hub and CDN handlers below define it

    def receive(self, body: bytes) -> None:
        """Each server's answer to an upload: the hub's write API, or the CDN taking LFS bytes."""
        raise NotImplementedError  # the hub and CDN handlers below define it

    def read_body(self) -> bytes:
        """The request's body, sent with a Content-Length or in chunks."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline().strip():  # trailer lines up to the empty one
            pass
        return b"".join(chunks)

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

    def receive(self, body: bytes) -> None:
        """PUT /upload/{sha256}: the bytes of an LFS object the batch answer announced."""
        sha256 = urlsplit(self.path).path.removeprefix("/upload/")
        if self.command != "PUT" or sha256 not in self.hub.announced:
            self.send(403, {"Content-Type": "text/plain"}, b"Forbidden")
        elif hashlib.sha256(body).hexdigest() != sha256 or len(body) != self.hub.announced[sha256]:
            self.send(400, {"Content-Type": "text/plain"}, b"The bytes do not match the announced sha256 and size")
        else:
            self.hub.keep(body)
            self.send(200, {"ETag": f'"{sha256}"'})


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

    def find_repo(self, repo_id: str, head: bool = False) -> Repo | None:
        """The repo, or None once a redirect (renamed repo) or a 404 has been answered."""
        if repo_id in self.hub.renamed:
            moved = f"{self.path}/".replace(f"/{repo_id}/", f"/{self.hub.renamed[repo_id]}/", 1)[:-1]
            self.send(307, {"Location": moved}, b"", head)
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self.send_error_code(404, "RepoNotFound", "Repository not found", head)
        elif repo_id in self.hub.private and not self.headers.get("Authorization"):
            self.send_error_code(401, "RepoNotFound", "Repository not found", head)
            return None
        return repo

    def find_revision(self, repo: Repo, revision: str, head: bool = False) -> Repo | None:
        """The repo at that branch or commit, or None once a 404 has been answered."""
        found = self.hub.at_revision(repo.repo_id, revision)
        if found is None:
            self.send_error_code(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return found

    def find(self, repo_id: str, revision: str, head: bool = False) -> Repo | None:
        repo = self.find_repo(repo_id, head)
        return repo and self.find_revision(repo, revision, head)

    def resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self.find(repo_id, revision, head)
        if repo is None:
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
        repo = self.find(repo_id, revision, head)
        if repo is None:
            return
        self.send_json({
            "_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": repo.commit, "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "private": repo.repo_id in self.hub.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": path} for path in repo.files],
        }, head)

    def tree(self, repo_id: str, revision: str, subpath: str, query: dict, head: bool) -> None:
        repo = self.find(repo_id, revision, head)
        if repo is None:
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

    # ---- writes: create_repo, create_branch, upload_folder ------------------------------------

    def receive(self, body: bytes) -> None:
        path = urlsplit(self.path).path
        settings = path.startswith("/api/models/") and path.endswith("/settings")
        if self.command != ("PUT" if settings else "POST"):
            self.send(405, {"Content-Type": "text/plain"}, b"Method Not Allowed")
            return
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            self.send_error_code(401, "Unauthorized", "Invalid credentials in Authorization header", False)
            return
        try:
            request = body if "/commit/" in path else json.loads(body or b"{}")  # a commit is NDJSON
        except json.JSONDecodeError:
            self.send_error_code(400, "BadRequest", "The body is not JSON", False)
            return
        if settings:
            return self.update_settings(unquote(path[len("/api/models/"):-len("/settings")]), request)
        if path == "/api/repos/create":
            return self.create_repo(request)
        if path == "/api/validate-yaml":
            return self.validate_yaml(request)
        if path.endswith(LFS_BATCH):
            return self.lfs_batch(unquote(path[1 : -len(LFS_BATCH)]), request)
        rest = path.removeprefix("/api/models/")
        for marker, action in (("/preupload/", self.preupload), ("/commit/", self.commit), ("/branch/", self.branch)):
            if path.startswith("/api/models/") and marker in rest:
                repo_id, _, revision = rest.partition(marker)
                return action(repo_id, unquote(revision), request)
        self.send(404, {"Content-Type": "text/plain"}, b"Not Found")

    def create_repo(self, request: dict) -> None:
        if request.get("type", "model") != "model":
            self.send_error_code(400, "BadRequest", "This hub keeps model repositories only", False)
            return
        repo_id = f"{request.get('organization') or self.hub.user}/{request['name']}"
        private = request.get("private") is True or request.get("visibility") == "private"
        url = f"{self.hub.endpoint}/{repo_id}"
        if self.hub.create_repo(repo_id, private):
            self.send_json({"url": url, "name": repo_id, "id": repo_id}, False)
        else:
            self.send(409, {"Content-Type": "application/json"},
                      json.dumps({"error": "You already created this model repo", "url": url}).encode())

    def update_settings(self, repo_id: str, request: dict) -> None:
        """A repository's visibility (and gating, accepted and not kept: this hub gates nothing)."""
        if self.find_repo(repo_id) is None:
            return
        visibility, gated = request.get("visibility"), request.get("gated", False)
        if not request or set(request) - {"visibility", "gated"} or visibility not in (None, "public", "private") \
                or gated not in ("auto", "manual", False):
            self.send_error_code(400, "BadRequest", f"Invalid settings: {json.dumps(request)}", False)
            return
        if visibility:
            self.hub.set_private(repo_id, visibility == "private")
        self.send_json({}, False)

    def branch(self, repo_id: str, branch: str, request: dict) -> None:
        start = self.find(repo_id, request.get("startingPoint") or MAIN)
        if start is None:
            return
        if self.hub.at_revision(repo_id, branch) is not None:
            self.send_error_code(409, "Conflict", f"Reference already exists: refs/heads/{branch}", False)
            return
        self.hub.set_head(repo_id, branch, start)
        self.send_json({}, False)

    def validate_yaml(self, request: dict) -> None:
        """The front matter of a README.md must parse as a YAML mapping (the hub checks its keys too)."""
        content = request.get("content", "")
        front = content.split("---\n")[1] if content.startswith("---\n") and content.count("---\n") >= 2 else ""
        try:
            metadata = yaml.safe_load(front) if front else {}
        except yaml.YAMLError as error:
            metadata = error
        if not isinstance(metadata, dict):
            self.send(400, {"Content-Type": "application/json"},
                      json.dumps({"errors": [{"message": f"Invalid YAML metadata: {metadata}"}]}).encode())
        else:
            self.send_json({"errors": [], "warnings": []}, False)

    def preupload(self, repo_id: str, revision: str, request: dict) -> None:
        """Per file: LFS for weights, regular for the rest, and the oid of the file already there."""
        repo = self.find(repo_id, revision)
        if repo is None:
            return
        answers = []
        for path in (file["path"] for file in request["files"]):
            there = repo.files.get(path)
            answers.append({"path": path, "uploadMode": "lfs" if path.endswith(LFS_SUFFIXES) else "regular",
                            "shouldIgnore": False, "oid": there and (there.sha256 or there.blob_id)})
        self.send_json({"files": answers}, False)

    def lfs_batch(self, repo_id: str, request: dict) -> None:
        """Where to PUT each LFS object: a URL on the CDN, or no action for bytes the hub holds already."""
        if self.find_repo(repo_id) is None:
            return
        objects = []
        for item in request["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if self.hub.blob(item["oid"]) is None:
                self.hub.announced[item["oid"]] = item["size"]
                entry["actions"] = {"upload": {"href": f"{self.hub.cdn}/upload/{item['oid']}"}}
            objects.append(entry)
        self.send(200, {"Content-Type": "application/vnd.git-lfs+json"},
                  json.dumps({"transfer": "basic", "objects": objects}).encode())

    def commit(self, repo_id: str, revision: str, body: bytes) -> None:
        """Apply the NDJSON operations to the revision's files: a new commit at the head of that branch."""
        repo = self.find(repo_id, revision)
        if repo is None:
            return
        if revision not in self.hub.branches.get(repo_id, {}) and revision != MAIN:
            self.send_error_code(400, "BadRequest", f"{revision} is not a branch", False)
            return
        header, *operations = [json.loads(line) for line in body.splitlines() if line.strip()]
        files = dict(repo.files)
        for operation in operations:
            path = operation["value"]["path"]
            if operation["key"] == "file":
                files[path] = describe_file(path, self.hub.keep(base64.b64decode(operation["value"]["content"])))
            elif operation["key"] == "lfsFile":
                location = self.hub.lfs_object(operation["value"]["oid"])
                if location is None:
                    self.send_error_code(422, "BadRequest", f"The LFS object of {path} was never uploaded", False)
                    return
                files[path] = describe_file(path, location)
            elif operation["key"] == "deletedFile":
                files.pop(path, None)
            elif operation["key"] == "deletedFolder":
                files = {kept: file for kept, file in files.items() if not kept.startswith(path.rstrip("/") + "/")}
        new = Repo.of_files(repo_id, files.values(), f"{repo.commit}\n{header['value']['summary']}\n")
        self.hub.set_head(repo_id, revision, new)
        self.send_json({"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{new.commit}", "commitOid": new.commit,
                        "pullRequestUrl": None, "success": True}, False)


def _file_entry(file: RepoFile) -> dict:
    entry = {"type": "file", "oid": file.blob_id, "size": file.size, "path": file.path}
    if file.sha256 is not None:
        entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": len(file.pointer)}
    return entry


def hub_environment(endpoint: str, hf_home: Path, offline: bool = False, token: str | None = None) -> dict[str, str]:
    """This process's environment for a child process whose hub is `endpoint` and whose cache is under
    `hf_home`, every other Hugging Face setting dropped; `offline` adds HF_HUB_OFFLINE=1, `token` HF_TOKEN.
    Uploads go by LFS (HF_HUB_DISABLE_XET=1): this hub does not speak Xet."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    environment.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1")
    if token is not None:
        environment["HF_TOKEN"] = token
    return {**environment, "HF_HUB_OFFLINE": "1"} if offline else environment

"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for the real `huggingface_hub` client.

It serves folders on disk as model (or data set) repos through the routes `snapshot_download` and
`hf_hub_download` call: model info (`/api/models/{repo}[/revision/{rev}]`), the tree listing
(`/api/models/{repo}/tree/{rev}`), and `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with `ETag`,
`X-Repo-Commit`, `Content-Length` and byte ranges (for data sets, `/api/datasets/...` and
`/datasets/{repo}/resolve/...`). A repo may hold several revisions (branches
or tags, each its own folder and commit sha; "main" is the default), asked for by name or sha.
Unknown repos answer 404 with `X-Error-Code: RepoNotFound`, unknown revisions with
`RevisionNotFound`; a gated repo's files answer 401 (`X-Error-Code: GatedRepo`) unless the request
carries `Authorization: Bearer <its token>`.

    with FakeHub() as hub:
        hub.add_repo("org/tiny", folder)
        env = {"HF_ENDPOINT": hub.url, ...}   # huggingface_hub reads it at import
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    folder: Path
    sha: str
    files: dict[str, tuple[int, str, str]]  # path -> (size, git blob sha1, sha256)
    token: Optional[str] = None  # set: gated, its files need this bearer token


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Breakage:
    """The next GET of `path` sends `after_bytes` of it and drops the connection; then, until
    `FakeHub.restore()`, every request for it is dropped before any answer (the network is
    down)."""

    path: str
    after_bytes: int
    tripped: bool = False


@dataclass
class FakeHub:
    repos: dict[str, dict[str, Repo]] = field(default_factory=dict)  # id -> revision -> Repo
    requests: list[Request] = field(default_factory=list)
    breakages: list[Breakage] = field(default_factory=list)

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        token: Optional[str] = None,
        revision: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Serve every file under `folder` as `revision` of `repo_id` (a model repo, or with
        `repo_type="dataset"` a data set repo); with `token`, the repo is gated. Returns the
        commit sha it is served at."""
        if repo_type == "dataset":  # the Hub's URLs name data set repos datasets/org/name
            repo_id = f"datasets/{repo_id}"
        files, commit = {}, hashlib.sha1(f"{repo_id}@{revision}".encode())
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            data = path.read_bytes()
            name = path.relative_to(folder).as_posix()
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            files[name] = (len(data), blob, hashlib.sha256(data).hexdigest())
            commit.update(name.encode() + blob.encode())
        self.repos.setdefault(repo_id, {})[revision] = Repo(
            Path(folder), commit.hexdigest(), files, token
        )
        return commit.hexdigest()

    def break_file(self, path: str, after_bytes: int) -> None:
        self.breakages.append(Breakage(path, after_bytes))

    def restore(self) -> None:
        self.breakages.clear()

    def gets(self, suffix: str = "") -> list[Request]:
        """The GET requests for files (resolve routes) whose path ends with `suffix`."""
        return [
            r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
            and r.path.endswith(suffix)
        ]  # fmt: skip

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """An http://127.0.0.1 URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# The info and tree routes of each repo type -> the prefix of its repos' keys in FakeHub.repos.
API_ROUTES = {"/api/models/": "", "/api/datasets/": "datasets/"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._route(body=True)

    def do_HEAD(self) -> None:
        self._route(body=False)

    # --- routing

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.fake.requests.append(
            Request(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        )
        api = next((a for a in API_ROUTES if path.startswith(a)), None)
        if api is not None:
            repo_id, rest = self._split_repo(API_ROUTES[api] + path[len(api) :])
            if repo_id is None:
                return self._repo_not_found()
            if m := re.fullmatch(r"(?:/revision/([^/]+))?", rest):
                repo = self._at(repo_id, m.group(1) or "main")
                if repo is None:
                    return None
                return self._json(self._info(repo_id, repo), body)
            if m := re.fullmatch(r"/tree/([^/]+)(/.*)?", rest):
                repo = self._at(repo_id, m.group(1))
                if repo is None:
                    return None
                return self._json(self._tree(repo, (m.group(2) or "").strip("/")), body)
            return self._error(404, "EntryNotFound", f"no route {path}")
        if "/resolve/" in path:
            repo_part, _, rest = path.lstrip("/").partition("/resolve/")
            if repo_part not in self.fake.repos:
                return self._repo_not_found()
            revision, _, file = rest.partition("/")
            repo = self._at(repo_part, revision)
            if repo is None:
                return None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self._error(
                    401,
                    "GatedRepo",
                    f"Access to model {repo_part} is restricted. You must have access to it and "
                    "be authenticated to access it. Please log in.",
                )
            if file not in repo.files:
                return self._error(404, "EntryNotFound", f"{file} does not exist")
            return self._file(repo, file, body)
        return self._error(404, None, "not found")

    def _split_repo(self, rest: str) -> tuple[Optional[str], str]:
        """(repo id, the rest of the path) for a path that starts with a known repo id."""
        for repo_id in sorted(self.fake.repos, key=len, reverse=True):
            if rest == repo_id or rest.startswith(repo_id + "/"):
                return repo_id, rest[len(repo_id) :]
        return None, ""

    def _at(self, repo_id: str, revision: str) -> Optional[Repo]:
        """`revision` (a name or a commit sha) of `repo_id`; None after answering 404."""
        for name, repo in self.fake.repos[repo_id].items():
            if revision in (name, repo.sha):
                return repo
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return None

    # --- answers

    def _info(self, repo_id: str, repo: Repo) -> dict:
        return {
            "id": repo_id.removeprefix("datasets/"),
            "modelId": repo_id,
            "sha": repo.sha,
            "private": False,
            "gated": "manual" if repo.token else False,
            "siblings": [{"rfilename": name} for name in repo.files],
        }

    def _tree(self, repo: Repo, under: str) -> list[dict]:
        return [
            {"type": "file", "path": name, "size": size, "oid": blob}
            for name, (size, blob, _) in repo.files.items()
            if not under or name.startswith(under + "/")
        ]

    def _file(self, repo: Repo, file: str, body: bool) -> None:
        size, _, sha256 = repo.files[file]
        breakage = next((b for b in self.fake.breakages if b.path == file), None)
        if breakage is not None and body and breakage.tripped:
            return self._drop()
        start, end, status = 0, size, 200
        if m := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start, status = int(m.group(1)), 206
            end = min(int(m.group(2)) + 1, size) if m.group(2) else size
            if start >= size:
                return self._error(416, None, f"range not satisfiable: {m.group(0)}")
        self.send_response(status)
        self.send_header("ETag", f'"{sha256}"')
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not body:
            return None
        with open(repo.folder / file, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if breakage is not None:
            breakage.tripped = True
            self.wfile.write(data[: breakage.after_bytes])
            self.wfile.flush()
            return self._drop()
        self.wfile.write(data)
        return None

    def _drop(self) -> None:
        """Close the connection at once, mid-answer or before any."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _json(self, value, body: bool) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _repo_not_found(self) -> None:
        self._error(404, "RepoNotFound", "Repository not found")

    def _error(self, status: int, code: Optional[str], message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

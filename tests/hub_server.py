"""A small Hugging Face Hub-compatible HTTP server on loopback, for tests of pushing and loading by repo id.

The real ``huggingface_hub`` client (and transformers, diffusers and vLLM through it) talks to this server when
``HF_ENDPOINT`` (or ``endpoint=``) points at :attr:`HubServer.url`. It implements the part of the Hub's HTTP API
those clients use, with the Hub's status codes and ``X-Error-Code`` headers:

* auth: ``Authorization: Bearer TOKEN``; tokens map to ``(user, role)`` with role ``"write"`` or ``"read"``. An
  unknown token gets 401 ``Invalid credentials in Authorization header`` on every route, as on the Hub;
  ``GET /api/whoami-v2``;
* repos: ``POST /api/repos/create`` (409 if it exists; the first commit holds ``.gitattributes``, like the Hub's),
  private repos (401 ``RepoNotFound`` to anyone but their owner), ``POST /api/models/{repo}/branch/{name}``,
  ``GET /api/models/{repo}/refs``, ``GET /api/models/{repo}/commits/{rev}``;
* uploads as ``huggingface_hub`` 2.4 does them without Xet (``HF_HUB_DISABLE_XET=1``): ``POST .../preupload/{rev}``
  (``regular`` or ``lfs`` per file: LFS for weight suffixes, binary samples or files of 10 MiB or more), the LFS
  batch API ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer: one ``PUT`` per object to an upload URL
  of this server, then a ``verify`` call), and ``POST .../commit/{rev}`` (NDJSON: header, ``file``, ``lfsFile``,
  ``deletedFile``/``deletedFolder``); ``POST /api/validate-yaml`` parses the README's metadata;
* downloads: ``GET /api/models/{repo}[/revision/{rev}]`` (model info with ``sha``, ``siblings``, ``cardData``,
  ``tags``), ``GET .../tree/{rev}[/{path}]``, ``POST .../paths-info/{rev}``, and ``HEAD``/``GET``
  ``/{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS
  files, and ``Range`` requests.

Commits are atomic: the new tree is built on a private copy and the branch moves in one assignment under a lock,
after every operation was checked, so a failed commit leaves the branch where it was. Blobs are content-addressed
files under ``root``; a blob uploaded by a failed push is never visible in any revision.

Faults are injected per route with :meth:`HubServer.inject`: the next ``times`` matching requests get ``status``;
an ``lfs-upload`` fault can first read ``after_bytes`` of the body (an upload that dies midway), a ``commit``
fault applies half of the operations to the staging tree before it fails (nothing of it may become visible), and a
``commit`` fault with ``applied=True`` makes the commit and then answers the error (a commit whose answer is lost).

Run it by hand: ``python tests/hub_server.py --root /tmp/hub --token hf_me:alice:write`` (prints the URL).
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import json
import re
import secrets
import shutil
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["HubServer", "Fault", "ROUTES"]

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npy", ".npz", ".onnx", ".msgpack", ".h5",
                ".pkl", ".zip", ".tar", ".gz", ".png", ".jpg")
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
ROUTES = ("whoami", "create-repo", "validate-yaml", "preupload", "lfs-batch", "lfs-upload", "lfs-verify", "commit",
          "branch", "refs", "commits", "repo-info", "tree", "paths-info", "resolve")
_CHUNK = 1 << 20


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class Entry:
    """One file of a revision: ``git_oid`` is the git blob id (of the LFS pointer for LFS files)."""

    size: int
    sha256: str
    git_oid: str
    lfs: bool

    def tree_json(self, path: str) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            d["lfs"] = {"oid": self.sha256, "size": self.size,
                        "pointerSize": len(_lfs_pointer(self.sha256, self.size))}
        return d


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    tree: dict[str, Entry]
    date: float


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    created: float = 0.0


@dataclass
class Fault:
    """The next ``times`` requests of ``route`` fail with ``status`` (see the module docstring)."""

    route: str
    times: int = 1
    status: int = 500
    after_bytes: int | None = None
    applied: bool = False
    message: str = "Internal Server Error (injected by the test server)"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """The server: ``with HubServer(root, tokens={"hf_x": ("alice", "write")}) as hub: ... hub.url``.

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        log: ``(method, path, status)`` of every request, in order (for assertions).
    """

    def __init__(self, root: str | Path, tokens: dict[str, tuple[str, str]] | None = None, port: int = 0):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {})
        for tok, (_, role) in self.tokens.items():
            if role not in ("read", "write"):
                raise ValueError(f"token {tok!r}: role must be 'read' or 'write', got {role!r}")
        self.repos: dict[tuple[str, str], Repo] = {}
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []
        self._lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- test controls --------------------------------------------------------------------------
    def inject(self, route: str, times: int = 1, status: int = 500, after_bytes: int | None = None,
               applied: bool = False) -> Fault:
        if route not in ROUTES:
            raise ValueError(f"route={route!r}: expected one of {ROUTES}")
        if applied and route != "commit":
            raise ValueError("applied=True only makes sense for route='commit'")
        f = Fault(route, times, status, after_bytes, applied)
        with self._lock:
            self.faults.append(f)
        return f

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, route: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.route == route and f.times > 0:
                    f.times -= 1
                    return f
        return None

    def requests_for(self, substring: str, method: str | None = None) -> list[tuple[str, str, int]]:
        with self._lock:
            return [r for r in self.log if substring in r[1] and (method is None or r[0] == method)]

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str | None:
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            return None if repo is None else repo.branches.get(branch)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a revision, read from the blob store (for assertions)."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            commit = repo.commits[self._resolve_rev(repo, revision)]
        return {p: self.blob_path(e.sha256).read_bytes() for p, e in commit.tree.items()}

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    # ---- state ----------------------------------------------------------------------------------
    def _store_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.blob_path(sha)
        if not p.exists():
            tmp = p.with_name(p.name + f".{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            tmp.replace(p)
        return sha

    def _new_commit(self, repo: Repo, parent: str | None, tree: dict[str, Entry], title: str, desc: str) -> Commit:
        body = json.dumps({"parent": parent, "title": title, "tree": {p: e.git_oid for p, e in sorted(tree.items())},
                           "nonce": secrets.token_hex(8)}).encode()
        c = Commit(hashlib.sha1(body).hexdigest(), parent, title, desc, dict(tree), _now())
        repo.commits[c.oid] = c
        return c

    def create_repo(self, repo_id: str, owner: str, private: bool, repo_type: str = "model") -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, "You already created this model repo", headers={"X-Error-Code": "RepoExists"})
            repo = Repo(repo_id, repo_type, owner, private, created=_now())
            sha = self._store_bytes(GITATTRIBUTES)
            entry = Entry(len(GITATTRIBUTES), sha, _git_blob_oid(GITATTRIBUTES), False)
            c = self._new_commit(repo, None, {".gitattributes": entry}, "initial commit", "")
            repo.branches["main"] = c.oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    @staticmethod
    def _resolve_rev(repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        matches = [oid for oid in repo.commits if len(rev) >= 7 and oid.startswith(rev)]
        if len(matches) == 1:
            return matches[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def _now() -> float:
    import time

    return time.time()


def _front_matter(readme: bytes) -> dict[str, Any]:
    """The YAML metadata block of a model card, or {} (raises HubError 400 if it does not parse)."""
    text = readme.decode("utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not m:
        return {}
    import yaml

    try:
        data = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        raise HubError(400, f"Invalid YAML in README.md: {e}") from None
    if not isinstance(data, dict):
        raise HubError(400, "README.md metadata must be a mapping")
    return data


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "rotkv-test-hub/1"

        def log_message(self, fmt, *args):  # keep test output clean; requests are in hub.log
            pass

        # ---- plumbing ---------------------------------------------------------------------------
        def _status(self, status: int) -> None:
            with hub._lock:
                hub.log.append((self.command, self.path, status))

        def _send(self, status: int, body: Any = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self._status(status)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, e: HubError) -> None:
            headers = dict(e.headers)
            headers.setdefault("X-Error-Message", e.message)
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message}, headers)

        def _body_chunks(self):
            """The request body, as chunks (Content-Length or chunked transfer encoding)."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return
                    left = size
                    while left:
                        chunk = self.rfile.read(min(left, _CHUNK))
                        if not chunk:
                            raise ConnectionError("client closed the connection mid-body")
                        left -= len(chunk)
                        yield chunk
                    self.rfile.readline()
            else:
                left = int(self.headers.get("Content-Length") or 0)
                while left:
                    chunk = self.rfile.read(min(left, _CHUNK))
                    if not chunk:
                        raise ConnectionError("client closed the connection mid-body")
                    left -= len(chunk)
                    yield chunk

        def _body(self) -> bytes:
            return b"".join(self._body_chunks())

        def _json(self) -> Any:
            raw = self._body()
            return json.loads(raw) if raw else {}

        def _user(self) -> tuple[str, str] | None:
            auth = self.headers.get("Authorization")
            if not auth:
                return None
            tok = auth.removeprefix("Bearer ").strip()
            if tok not in hub.tokens:
                raise HubError(401, "Invalid credentials in Authorization header")
            return hub.tokens[tok]

        def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
            user = self._user()
            with hub._lock:
                repo = hub.repos.get((repo_type, repo_id))
            if repo is None or (repo.private and (user is None or user[0] != repo.owner)):
                # The Hub answers 401 RepoNotFound for missing and private repos alike.
                raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
            if write:
                if user is None:
                    raise HubError(401, "You must be authenticated to write to this repo")
                if user[0] != repo.owner or user[1] != "write":
                    raise HubError(403, f"You don't have the rights to write to {repo_id} (token role {user[1]!r})")
            return repo

        def _fault(self, route: str) -> Fault | None:
            f = hub._take_fault(route)
            if f is not None and f.after_bytes is None and route != "commit":
                self._body()  # drain, so the connection stays usable
                raise HubError(f.status, f.message)
            return f

        # ---- dispatch ---------------------------------------------------------------------------
        def do_GET(self):
            self._dispatch()

        def do_HEAD(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def do_PUT(self):
            self._dispatch()

        def _dispatch(self) -> None:
            raw_path, _, query = self.path.partition("?")
            params = urllib.parse.parse_qs(query)
            segs = raw_path.split("/")[1:]
            try:
                self._route(self.command, segs, params)
            except HubError as e:
                self._error(e)
            except (ConnectionError, BrokenPipeError):
                self.close_connection = True
            except Exception as e:  # a bug in this server: make it visible to the client and the test
                self._error(HubError(500, f"test hub server bug: {type(e).__name__}: {e}"))

        def _route(self, method: str, segs: list[str], params: dict[str, list[str]]) -> None:
            uq = urllib.parse.unquote
            if segs[:2] == ["api", "whoami-v2"] and method == "GET":
                self._fault("whoami")
                return self._whoami()
            if segs[:3] == ["api", "repos", "create"] and method == "POST":
                self._fault("create-repo")
                return self._create_repo()
            if segs[:2] == ["api", "validate-yaml"] and method == "POST":
                self._fault("validate-yaml")
                return self._validate_yaml()
            if segs[:1] == ["__lfs"] and len(segs) >= 5:
                repo_id, oid = f"{uq(segs[2])}/{uq(segs[3])}", segs[4]
                if segs[1] == "upload" and method == "PUT":
                    return self._lfs_upload(repo_id, oid, params)
                if segs[1] == "verify" and method == "POST":
                    self._fault("lfs-verify")
                    return self._lfs_verify(repo_id)
            if len(segs) >= 4 and segs[0] == "api" and segs[1] in ("models", "datasets", "spaces"):
                repo_type = segs[1][:-1]
                repo_id = f"{uq(segs[2])}/{uq(segs[3])}"
                rest = segs[4:]
                return self._api_repo(method, repo_type, repo_id, rest, params)
            if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
                self._fault("resolve")
                return self._resolve("model", f"{uq(segs[0])}/{uq(segs[1])}", uq(segs[3]),
                                     "/".join(uq(s) for s in segs[4:]))
            if len(segs) >= 6 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"] \
                    and segs[5] == "batch" and method == "POST":
                self._fault("lfs-batch")
                return self._lfs_batch("model", f"{uq(segs[0])}/{uq(segs[1][:-4])}")
            raise HubError(404, f"test hub server: no route for {method} {self.path}")

        def _api_repo(self, method, repo_type, repo_id, rest, params) -> None:
            uq = urllib.parse.unquote
            head = rest[0] if rest else ""
            if method == "GET" and head in ("", "revision"):
                self._fault("repo-info")
                rev = uq(rest[1]) if head == "revision" and len(rest) > 1 else "main"
                return self._repo_info(repo_type, repo_id, rev, params)
            if method == "GET" and head == "tree":
                self._fault("tree")
                return self._tree(repo_type, repo_id, uq(rest[1]), "/".join(uq(s) for s in rest[2:]), params)
            if method == "POST" and head == "paths-info":
                self._fault("paths-info")
                return self._paths_info(repo_type, repo_id, uq(rest[1]))
            if method == "POST" and head == "preupload":
                self._fault("preupload")
                return self._preupload(repo_type, repo_id, uq(rest[1]))
            if method == "POST" and head == "commit":
                fault = self._fault("commit")
                return self._commit(repo_type, repo_id, uq(rest[1]), params, fault)
            if method == "POST" and head == "branch":
                self._fault("branch")
                return self._branch(repo_type, repo_id, uq(rest[1]))
            if method == "GET" and head == "refs":
                self._fault("refs")
                return self._refs(repo_type, repo_id)
            if method == "GET" and head == "commits":
                self._fault("commits")
                return self._commits(repo_type, repo_id, uq(rest[1]) if len(rest) > 1 else "main")
            raise HubError(404, f"test hub server: no route for {method} {self.path}")

        # ---- account and repos -----------------------------------------------------------------
        def _whoami(self) -> None:
            user = self._user()
            if user is None:
                raise HubError(401, "Unauthorized: no token")
            name, role = user
            self._send(200, {"type": "user", "id": hashlib.sha1(name.encode()).hexdigest()[:24], "name": name,
                             "fullname": name, "orgs": [], "auth": {"type": "access_token",
                                                                    "accessToken": {"displayName": "test",
                                                                                    "role": role}}})

        def _create_repo(self) -> None:
            user = self._user()
            payload = self._json()
            if user is None:
                raise HubError(401, "You must be authenticated to create a repo")
            if user[1] != "write":
                raise HubError(403, "You don't have the rights to create a repo with a read token")
            ns = payload.get("organization") or user[0]
            if ns != user[0]:
                raise HubError(403, f"You don't have the rights to create a repo under {ns!r}")
            name = payload.get("name") or ""
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
                raise HubError(400, f"Invalid repo name {name!r}")
            repo_type = payload.get("type") or "model"
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo_id = f"{ns}/{name}"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            try:
                hub.create_repo(repo_id, user[0], private, repo_type)
            except HubError as e:  # like the Hub, a 409 still names the repo's URL (create_repo(exist_ok) reads it)
                return self._send(e.status, {"error": f"{e.message}: {repo_id}", "url": url},
                                  {"X-Error-Message": e.message})
            self._send(200, {"url": url, "name": repo_id, "id": repo_id})

        def _validate_yaml(self) -> None:
            payload = self._json()
            try:
                _front_matter(str(payload.get("content", "")).encode())
            except HubError as e:
                return self._send(400, {"errors": [{"message": e.message}], "warnings": []})
            self._send(200, {"errors": [], "warnings": []})

        def _branch(self, repo_type, repo_id, branch) -> None:
            repo = self._repo(repo_type, repo_id, write=True)
            payload = self._json()
            with hub._lock:
                if branch in repo.branches:
                    raise HubError(409, f"Branch {branch} already exists")
                start = payload.get("startingPoint") or "main"
                repo.branches[branch] = hub._resolve_rev(repo, start)
            self._send(200, {})

        def _refs(self, repo_type, repo_id) -> None:
            repo = self._repo(repo_type, repo_id)
            with hub._lock:
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                            for b, oid in repo.branches.items()]
            self._send(200, {"branches": branches, "converts": [], "tags": []})

        def _commits(self, repo_type, repo_id, rev) -> None:
            repo = self._repo(repo_type, repo_id)
            out = []
            with hub._lock:
                oid: str | None = hub._resolve_rev(repo, rev)
                while oid is not None:
                    c = repo.commits[oid]
                    out.append({"id": c.oid, "title": c.title, "message": c.description, "date": _iso(c.date),
                                "authors": [{"user": repo.owner}]})
                    oid = c.parent
            self._send(200, out)

        # ---- downloads --------------------------------------------------------------------------
        def _commit_of(self, repo_type, repo_id, rev) -> tuple[Repo, Commit]:
            repo = self._repo(repo_type, repo_id)
            with hub._lock:
                return repo, repo.commits[hub._resolve_rev(repo, rev)]

        def _repo_info(self, repo_type, repo_id, rev, params) -> None:
            repo, c = self._commit_of(repo_type, repo_id, rev)
            card = {}
            if "README.md" in c.tree:
                try:
                    card = _front_matter(hub.blob_path(c.tree["README.md"].sha256).read_bytes())
                except HubError:
                    card = {}
            blobs = params.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for p, e in sorted(c.tree.items()):
                s: dict[str, Any] = {"rfilename": p}
                if blobs:
                    s.update(size=e.size, blobId=e.git_oid)
                    if e.lfs:
                        s["lfs"] = {"sha256": e.sha256, "size": e.size,
                                    "pointerSize": len(_lfs_pointer(e.sha256, e.size))}
                siblings.append(s)
            tags = list(card.get("tags") or [])
            info = {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                    "author": repo_id.split("/")[0], "sha": c.oid, "lastModified": _iso(c.date),
                    "createdAt": _iso(repo.created), "private": repo.private, "gated": False, "disabled": False,
                    "downloads": 0, "likes": 0, "tags": tags, "library_name": card.get("library_name"),
                    "pipeline_tag": card.get("pipeline_tag"), "cardData": card or None, "siblings": siblings,
                    "usedStorage": sum(e.size for e in c.tree.values())}
            self._send(200, info)

        def _entries(self, c: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
            prefix = path.strip("/") + "/" if path.strip("/") else ""
            files = {p: e for p, e in c.tree.items() if p.startswith(prefix)}
            out: dict[str, dict[str, Any]] = {}
            for p, e in sorted(files.items()):
                rel = p[len(prefix):]
                parts = rel.split("/")
                for i in range(1, len(parts)):
                    d = prefix + "/".join(parts[:i])
                    if (recursive or i == 1) and d not in out:
                        oid = hashlib.sha1(json.dumps(sorted((q, f.git_oid) for q, f in c.tree.items()
                                                             if q.startswith(d + "/"))).encode()).hexdigest()
                        out[d] = {"type": "directory", "oid": oid, "size": 0, "path": d}
                if recursive or len(parts) == 1:
                    out[p] = e.tree_json(p)
            return list(out.values())

        def _tree(self, repo_type, repo_id, rev, path, params) -> None:
            _, c = self._commit_of(repo_type, repo_id, rev)
            recursive = params.get("recursive", ["false"])[0].lower() == "true"
            entries = self._entries(c, path, recursive)
            if path and not entries:
                raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
            self._send(200, entries)

        def _paths_info(self, repo_type, repo_id, rev) -> None:
            _, c = self._commit_of(repo_type, repo_id, rev)
            raw = self._body().decode()
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                paths = json.loads(raw).get("paths", [])
            else:
                paths = urllib.parse.parse_qs(raw).get("paths", [])
            out = []
            for p in paths:
                p = p.strip("/")
                if p in c.tree:
                    out.append(c.tree[p].tree_json(p))
                elif any(q.startswith(p + "/") for q in c.tree):
                    out.extend(e for e in self._entries(c, p.rsplit("/", 1)[0] if "/" in p else "", False)
                               if e["path"] == p)
            self._send(200, out)

        def _resolve(self, repo_type, repo_id, rev, path) -> None:
            _, c = self._commit_of(repo_type, repo_id, rev)
            e = c.tree.get(path)
            if e is None:
                raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": c.oid})
            headers = {"X-Repo-Commit": c.oid, "Accept-Ranges": "bytes", "ETag": f'"{e.git_oid}"'}
            if e.lfs:
                headers.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size),
                                "ETag": f'"{e.sha256}"'})
            start, end = 0, e.size - 1
            status = 200
            rng = self.headers.get("Range")
            if rng and e.size:
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
                if m is None:
                    raise HubError(416, f"bad Range {rng!r}")
                if m.group(1):
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else e.size - 1
                else:
                    start = max(0, e.size - int(m.group(2)))
                end = min(end, e.size - 1)
                if start > end:
                    raise HubError(416, f"Range {rng!r} outside 0..{e.size - 1}",
                                   headers={"Content-Range": f"bytes */{e.size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{e.size}"
            length = end - start + 1 if e.size else 0
            self._status(status)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "HEAD" or not length:
                return
            with open(hub.blob_path(e.sha256), "rb") as f:
                f.seek(start)
                left = length
                while left:
                    chunk = f.read(min(left, _CHUNK))
                    self.wfile.write(chunk)
                    left -= len(chunk)

        # ---- uploads ----------------------------------------------------------------------------
        def _preupload(self, repo_type, repo_id, rev) -> None:
            repo = self._repo(repo_type, repo_id, write=True)
            payload = self._json()
            with hub._lock:
                tree = repo.commits[hub._resolve_rev(repo, rev)].tree if rev in repo.branches else {}
            out = []
            for f in payload.get("files", []):
                sample = base64.b64decode(f.get("sample", ""))
                lfs = (f["path"].endswith(LFS_SUFFIXES) or int(f.get("size", 0)) >= LFS_THRESHOLD
                       or b"\0" in sample)
                old = tree.get(f["path"])
                oid = None if old is None else (old.sha256 if old.lfs else old.git_oid)
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            self._send(200, {"files": out, "commitOid": repo.branches.get(rev)})

        def _lfs_batch(self, repo_type, repo_id) -> None:
            self._repo(repo_type, repo_id, write=True)
            payload = self._json()
            if payload.get("operation") != "upload":
                raise HubError(400, "this test server only implements LFS uploads")
            if "basic" not in payload.get("transfers", ["basic"]):
                raise HubError(400, "this test server only offers the basic LFS transfer")
            objects = []
            ns, name = repo_id.split("/")
            sig = secrets.token_hex(8)  # stands in for the presigned part of a storage URL
            for o in payload.get("objects", []):
                oid, size = o["oid"], int(o["size"])
                if not re.fullmatch(r"[0-9a-f]{64}", oid):
                    objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
                    continue
                if hub.blob_path(oid).exists():
                    objects.append({"oid": oid, "size": size})
                    continue
                base = f"{hub.url}/__lfs"
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{base}/upload/{ns}/{name}/{oid}?size={size}&sig={sig}", "header": {}},
                    "verify": {"href": f"{base}/verify/{ns}/{name}/{oid}", "header": {}},
                }})
            self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                       content_type="application/vnd.git-lfs+json")

        def _lfs_upload(self, repo_id, oid, params) -> None:
            fault = hub._take_fault("lfs-upload")
            size = int(params.get("size", ["-1"])[0])
            h = hashlib.sha256()
            n = 0
            tmp = Path(tempfile.mkstemp(dir=hub.blob_dir, suffix=".part")[1])
            try:
                with open(tmp, "wb") as out:
                    for chunk in self._body_chunks():
                        if fault is not None and fault.after_bytes is not None and n + len(chunk) > fault.after_bytes:
                            keep = max(0, fault.after_bytes - n)
                            out.write(chunk[:keep])
                            # The upload dies midway: answer the error and drop the connection.
                            self.close_connection = True
                            raise HubError(fault.status, fault.message)
                        h.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
                if fault is not None:
                    raise HubError(fault.status, fault.message)
                if h.hexdigest() != oid or (size >= 0 and n != size):
                    raise HubError(400, f"uploaded content does not match oid {oid} / size {size} (got {n} bytes)")
                tmp.replace(hub.blob_path(oid))
            finally:
                tmp.unlink(missing_ok=True)
            self._send(200, b"", content_type="text/plain")

        def _lfs_verify(self, repo_id) -> None:
            payload = self._json()
            p = hub.blob_path(str(payload.get("oid")))
            if not p.exists() or p.stat().st_size != int(payload.get("size", -1)):
                raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
            self._send(200, {})

        def _commit(self, repo_type, repo_id, rev, params, fault: Fault | None) -> None:
            repo = self._repo(repo_type, repo_id, write=True)
            if params.get("create_pr"):
                self._body()
                raise HubError(400, "this test server does not implement pull requests")
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                raise HubError(400, "commit payload must start with a header line")
            header = lines[0]["value"]
            with hub._lock:
                if rev not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                base = repo.branches[rev]
                tree = dict(repo.commits[base].tree)
            parent = header.get("parentCommit")
            if parent and not base.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}: the branch is at {base}")
            ops = lines[1:]
            for i, op in enumerate(ops):
                if fault is not None and not fault.applied and i >= len(ops) // 2:
                    # Half the operations are staged; the failure must leave the branch untouched.
                    raise HubError(fault.status, fault.message)
                key, v = op.get("key"), op.get("value", {})
                path = str(v.get("path", "")).strip("/")
                if key == "file":
                    if v.get("encoding", "base64") != "base64":
                        raise HubError(400, f"unsupported encoding {v.get('encoding')!r}")
                    data = base64.b64decode(v["content"])
                    tree[path] = Entry(len(data), hub._store_bytes(data), _git_blob_oid(data), False)
                elif key == "lfsFile":
                    oid = v.get("oid", "")
                    blob = hub.blob_path(oid)
                    if not blob.exists():
                        raise HubError(422, f"LFS object {oid} of {path} was never uploaded")
                    size = blob.stat().st_size
                    tree[path] = Entry(size, oid, _git_blob_oid(_lfs_pointer(oid, size)), True)
                elif key == "deletedFile":
                    if tree.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    for p in [p for p in tree if p.startswith(path + "/")]:
                        del tree[p]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            if fault is not None and not fault.applied:  # a commit with no operations still fails when armed
                raise HubError(fault.status, fault.message)
            if "README.md" in tree:
                _front_matter(hub.blob_path(tree["README.md"].sha256).read_bytes())
            with hub._lock:
                if repo.branches[rev] != base:
                    raise HubError(409, "the branch moved during the commit: retry")
                c = hub._new_commit(repo, base, tree, header.get("summary") or "", header.get("description") or "")
                repo.branches[rev] = c.oid  # the one assignment that makes the commit visible
            if fault is not None:  # applied: the commit happened, its answer is "lost"
                raise HubError(fault.status, fault.message)
            self._send(200, {"success": True, "commitOid": c.oid, "commitUrl": f"{hub.url}/{repo_id}/commit/{c.oid}",
                             "hookOutput": "", "pullRequestUrl": None})

    return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="a Hub-compatible test server on 127.0.0.1")
    ap.add_argument("--root", help="blob folder (default: a temporary folder, deleted at exit)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", action="append", default=[], help="TOKEN:USER:ROLE (role read or write); repeatable")
    args = ap.parse_args(argv)
    tokens = {}
    for t in args.token:
        tok, user, role = t.split(":")
        tokens[tok] = (user, role)
    tmp = None if args.root else tempfile.mkdtemp(prefix="hub-")
    hub = HubServer(args.root or tmp, tokens, args.port)
    print(f"HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        hub._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub._httpd.server_close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

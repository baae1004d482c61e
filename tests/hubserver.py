"""A fake Hugging Face Hub on 127.0.0.1, for running the real huggingface_hub client in tests.

It speaks the endpoints huggingface_hub 2.4.0 uses to download (see
`../shared/reference/hub-protocol.md`), serves repos built from local folders, and injects the
faults a user meets in real life:

    with FakeHub() as hub:
        commit = hub.add_repo("org/tiny", folder, tags=["v1"])  # branch "main" -> commit
        hub.corrupt_file("org/tiny", "model-00001-of-00002.safetensors")
        env = hub.client_env(tmp_path / "hf-home")               # for a subprocess
        subprocess.run([...], env=env)
        assert hub.fetched("org/tiny") == [...]                  # request log

Endpoints:

- `GET /api/models/{repo}[/revision/{rev}]`: model info, `sha` is the resolved commit.
- `GET /api/models/{repo}/tree/{rev}[/{folder}]`: the file listing (`oid`, `size`, `lfs`).
- `POST /api/models/{repo}/paths-info/{rev}`: the listing of some paths (`HfApi.get_paths_info`).
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: plain files answer 200 with `ETag` (git blob id);
  LFS files answer 302 to `/lfs/...` on the host name `localhost` (another origin, so the client
  drops its `Authorization` header) with `X-Linked-Etag` (sha256) and `X-Linked-Size`.
- `HEAD|GET /lfs/{repo}/{commit}/{path}`: the storage server; honours `Range`.

Errors follow the hub: `404` with `X-Error-Code: RepoNotFound | RevisionNotFound |
EntryNotFound`; a gated repo answers `401` (no token) or `403` (a token without access) with
`X-Error-Code: GatedRepo` on file downloads, while its metadata stays public (as on the hub).

Faults (per repo file, until `clear_faults()`) only change what file downloads send; the
metadata (listing, HEAD headers) always tells the truth, like a hub whose storage or network
misbehaves:

- `corrupt_file(repo, path)`: one byte changed, same size;
- `resize_file(repo, path, delta)`: `delta` bytes more or fewer;
- `drop_connection(repo, path, after, times)`: the connection closes after byte `after`, once
  (`times=1`, the client's retry recovers) or always (`times=None`, its retries run out);
- `add_repo(..., gated=True, tokens=[...])`: only those tokens may download;
- an unknown repo or revision is simply one that was never added.

`requests` logs every request (method, host, path, status, Range, whether a token was sent);
`fetched(repo)` lists the files whose content was sent.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Files stored with git LFS on the fake hub (the hub's own .gitattributes track these kinds).
DEFAULT_LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.model", "tokenizer.json")
STORAGE_HOST = "localhost"  # LFS redirects go here: same server, different origin


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's content (what the hub calls `oid` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git LFS pointer that git stores in place of an LFS file."""
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass
class Fault:
    """What a file download sends instead of the file; `times=None` means every time."""

    kind: str  # "corrupt" | "resize" | "drop"
    times: int | None = None
    delta: int = 0  # resize: bytes added (> 0) or cut (< 0)
    after: int = 0  # drop: the connection dies once this byte offset of the file is sent


@dataclass
class LoggedRequest:
    """One request the hub answered. `authorized` says whether a token was sent (never its value)."""

    method: str
    host: str
    path: str
    status: int
    range: str | None
    authorized: bool
    repo_id: str | None = None
    file: str | None = None  # the repo file of a resolve or storage request


@dataclass
class Repo:
    """A repo's history: every commit's files, and the branches and tags pointing at commits."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> content
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    gated: bool = False
    tokens: frozenset[str] = frozenset()  # tokens with access to a gated repo
    lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS


class FakeHub:
    """The fake hub: a `ThreadingHTTPServer` on 127.0.0.1 (a free port), started on `__enter__`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[LoggedRequest] = []
        self._faults: dict[tuple[str, str], Fault] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        # A short poll interval: `close()` waits for it, once per test.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        """The value for `HF_ENDPOINT` / `endpoint=`."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client_env(self, hf_home: str | os.PathLike[str], offline: bool = False) -> dict[str, str]:
        """Environment for a subprocess running huggingface_hub against this hub, and nothing else.

        A copy of `os.environ` without tokens or proxies, with its own `HF_HOME` (cache, stored
        token), Xet and telemetry off, and `HF_HUB_OFFLINE` set as asked.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="1" if offline else "0",
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
            NO_PROXY="127.0.0.1,localhost",
        )
        return env

    # -- repos --------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: str | os.PathLike[str],
        *,
        branch: str = "main",
        tags: tuple[str, ...] | list[str] = (),
        gated: bool = False,
        tokens: tuple[str, ...] | list[str] = (),
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
    ) -> str:
        """Create `repo_id` whose branch holds `folder`'s files (read now); returns the commit id."""
        self.repos[repo_id] = Repo(gated=gated, tokens=frozenset(tokens), lfs_patterns=lfs_patterns)
        return self.add_commit(repo_id, folder, branch=branch, tags=tags)

    def add_commit(
        self,
        repo_id: str,
        folder: str | os.PathLike[str],
        *,
        branch: str = "main",
        tags: tuple[str, ...] | list[str] = (),
    ) -> str:
        """Commit `folder`'s files on `branch` (moving it) and tag the commit; returns its id.

        Commit ids are made up deterministically from the repo, the parent and the content, so a
        changed folder gets a new id (the client caches file lists per commit).
        """
        repo = self.repos[repo_id]
        files = _read_folder(Path(folder))
        parent = repo.refs.get(branch, "")
        seed = "\n".join([repo_id, parent] + [f"{p} {git_blob_id(d)}" for p, d in sorted(files.items())])
        commit = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[commit] = files
        for ref in (branch, *tags):
            repo.refs[ref] = commit
        return commit

    # -- faults -------------------------------------------------------------------------------

    def corrupt_file(self, repo_id: str, path: str, times: int | None = None) -> None:
        """Serve `path` with one byte changed and the right size."""
        self._faults[(repo_id, path)] = Fault("corrupt", times)

    def resize_file(self, repo_id: str, path: str, delta: int = -1, times: int | None = None) -> None:
        """Serve `path` with `delta` bytes more (or fewer), and a matching `Content-Length`."""
        self._faults[(repo_id, path)] = Fault("resize", times, delta=delta)

    def drop_connection(self, repo_id: str, path: str, after: int = 0, times: int | None = 1) -> None:
        """Close the connection once byte offset `after` of `path` is sent (`times=None`: always).

        The headers promise the whole body. With `times=None` a resumed download gets no new byte,
        so the client's retries run out.
        """
        self._faults[(repo_id, path)] = Fault("drop", times, after=after)

    def clear_faults(self) -> None:
        self._faults.clear()

    def _take_fault(self, repo_id: str, path: str) -> Fault | None:
        """The fault for this download, counting it down."""
        with self._lock:
            fault = self._faults.get((repo_id, path))
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[(repo_id, path)]
            return fault

    # -- request log --------------------------------------------------------------------------

    def _log(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(entry)

    def fetched(self, repo_id: str | None = None) -> list[str]:
        """Sorted repo files whose content was sent (GET answered 200 or 206), each once."""
        return sorted(
            {
                r.file
                for r in self.requests
                if r.method == "GET" and r.file and r.status in (200, 206) and repo_id in (None, r.repo_id)
            }
        )


# -- repo content ------------------------------------------------------------------------------


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _is_lfs(repo: Repo, path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(path, pat) for pat in repo.lfs_patterns)


def _tree_entry(repo: Repo, path: str, data: bytes) -> dict:
    if not _is_lfs(repo, path):
        return {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
    pointer = lfs_pointer(data)
    lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
    return {"type": "file", "oid": git_blob_id(pointer), "size": len(data), "path": path, "lfs": lfs}


def _folders(files: dict[str, bytes]) -> list[str]:
    return sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})


def _faulty(data: bytes, fault: Fault | None) -> bytes:
    if fault is None or fault.kind == "drop":
        return data
    if fault.kind == "corrupt":
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
    return data[: len(data) + fault.delta] if fault.delta < 0 else data + b"\0" * fault.delta


class HubError(Exception):
    """An error answer: status, `X-Error-Code`, message."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


# -- HTTP --------------------------------------------------------------------------------------

_API = re.compile(
    r"^/api/models/(?P<repo>.+?)(?:/(?P<kind>revision|tree|paths-info)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_STORAGE = re.compile(r"^/lfs/(?P<repo>.+?)/(?P<commit>[0-9a-f]{40})/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer has a length
    server_version = "FakeHub/1"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self._entry = LoggedRequest(
            method=self.command,
            host=self.headers.get("Host", ""),
            path=unquote(url.path),
            status=0,
            range=self.headers.get("Range"),
            authorized=bool(self.headers.get("Authorization")),
        )
        # Read a POST body first: an error answer must not leave it in a keep-alive connection.
        self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if m := _API.match(url.path):
                self._api(m)
            elif m := _RESOLVE.match(url.path):
                self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]))
            elif m := _STORAGE.match(url.path):
                self._storage(unquote(m["repo"]), m["commit"], unquote(m["path"]))
            else:
                raise HubError(404, None, f"no such endpoint: {url.path}")
        except HubError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.hub._log(self._entry)

    # -- answers ------------------------------------------------------------------------------

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        """Answer with `body`; a given `Content-Length` overrides (HEAD, and a dropped body)."""
        self._entry.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj: object) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def _send_error(self, err: HubError) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send(err.status, headers, json.dumps({"error": err.message}).encode())

    # -- lookups ------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> Repo:
        self._entry.repo_id = repo_id
        if repo_id not in self.hub.repos:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return self.hub.repos[repo_id]

    def _commit(self, repo: Repo, revision: str) -> str:
        commit = repo.refs.get(revision, revision)
        if commit not in repo.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _check_access(self, repo_id: str, repo: Repo) -> None:
        if not repo.gated:
            return
        auth = self.headers.get("Authorization", "")
        if not auth:
            raise HubError(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
            )
        if auth.removeprefix("Bearer ") not in repo.tokens:
            raise HubError(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.hub.endpoint}/{repo_id} to ask for access.",
            )

    # -- endpoints ----------------------------------------------------------------------------

    def _api(self, m: re.Match[str]) -> None:
        repo_id = unquote(m["repo"])
        repo = self._repo(repo_id)
        commit = self._commit(repo, unquote(m["rev"] or "main"))
        files = repo.commits[commit]
        kind = m["kind"] or "revision"
        if kind == "revision":
            siblings = [{"rfilename": p} for p in sorted(files)]
            gated = "manual" if repo.gated else False
            info = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "gated": gated}
            self._send_json({**info, "disabled": False, "tags": [], "siblings": siblings})
        elif kind == "tree":
            self._send_json(self._tree(repo, files, unquote(m["sub"] or "").strip("/")))
        else:
            wanted = parse_qs(self._body.decode()).get("paths", [])
            entries = [_tree_entry(repo, p, files[p]) for p in wanted if p in files]
            entries += [
                {"type": "directory", "oid": "0" * 40, "path": p} for p in _folders(files) if p in wanted
            ]
            self._send_json(entries)

    def _tree(self, repo: Repo, files: dict[str, bytes], sub: str) -> list[dict]:
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{sub}/" if sub else ""

        def listed(path: str) -> bool:
            rest = path[len(prefix) :]
            return path.startswith(prefix) and (recursive or "/" not in rest)

        folders = [
            {"type": "directory", "oid": "0" * 40, "size": 0, "path": p} for p in _folders(files) if listed(p)
        ]
        return folders + [_tree_entry(repo, p, d) for p, d in sorted(files.items()) if listed(p)]

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        self._entry.file = path
        self._check_access(repo_id, repo)
        files = repo.commits[commit]
        if path not in files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", commit=commit)
        data = files[path]
        if _is_lfs(repo, path):
            sha = hashlib.sha256(data).hexdigest()
            location = f"http://{STORAGE_HOST}:{self.hub.port}/lfs/{quote(repo_id)}/{commit}/{quote(path)}"
            self._send(
                302,
                {
                    "Location": location,
                    "X-Repo-Commit": commit,
                    "ETag": f'"{git_blob_id(lfs_pointer(data))}"',
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": str(len(data)),
                },
            )
            return
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"'}
        self._send_file(repo_id, path, data, headers)

    def _storage(self, repo_id: str, commit: str, path: str) -> None:
        repo = self._repo(repo_id)
        self._entry.file = path
        if commit not in repo.commits or path not in repo.commits[commit]:
            raise HubError(404, None, "no such object")
        self._send_file(repo_id, path, repo.commits[commit][path], {})

    def _send_file(self, repo_id: str, path: str, data: bytes, headers: dict[str, str]) -> None:
        """Send the file (or its `Range`), as any fault for it says; HEAD tells the truth."""
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        if self.command == "HEAD":
            self._send(200, {**headers, "Content-Length": str(len(data))})
            return
        fault = self.hub._take_fault(repo_id, path)
        data = _faulty(data, fault)
        start = _range_start(self.headers.get("Range"), len(data))
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if fault is None or fault.kind != "drop":
            self._send(status, headers, body)
            return
        # Promise the whole body, send up to the fault's offset, then cut the connection.
        self._send(status, {**headers, "Content-Length": str(len(body))})
        self.wfile.write(body[: max(fault.after - start, 0)])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


def _range_start(header: str | None, size: int) -> int:
    """The first byte a `Range: bytes=N-[M]` asks for (the client only resumes, so M is ignored)."""
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
    return min(int(m[1]), size) if m else 0

"""A test double of the Hugging Face Hub: the few HTTP endpoints `rioquant publish` reaches, on 127.0.0.1.

Not a hub: no hub server installs on these machines, so this speaks just enough of the protocol for
huggingface_hub 2.x's `create_repo`, `create_branch` and `upload_folder` over git-LFS (the path taken
with HF_HUB_DISABLE_XET=1; the Xet path needs a CAS service and is not exercised here):

    POST /api/repos/create                                   → 200 (or 409 when it exists)
    POST /api/models/{repo}/branch/{branch}                  → 200
    POST /api/models/{repo}/preupload/{revision}             → upload mode per file (.gguf → lfs)
    POST /{repo}.git/info/lfs/objects/batch                  → basic transfer, one PUT href per object
    PUT  /lfs-upload/{oid}                                   → stores the bytes
    POST /api/models/{repo}/commit/{revision}                → applies the NDJSON commit
    POST /api/validate-yaml                                  → 400 unless the README's front matter is YAML
    GET  /api/agent-harnesses                                → an empty registry (the client's telemetry)

and, for `rioquant convert ORG/REPO` (a source streamed from the Hub), what `model_info` and
`hf_hub_download` read from a repository `serve`d from files:

    GET  /api/models/{repo}[/revision/{rev}]                  → commit sha and every file (size, LFS sha256)
    HEAD /{repo}/resolve/{rev}/{path}                         → X-Repo-Commit, ETag / X-Linked-Etag, size
    GET  /{repo}/resolve/{rev}/{path}                         → the bytes (a Range request: 206 and that range)

An unknown revision answers 404 with X-Error-Code RevisionNotFound, as the Hub does.

Anything else is answered 404 and recorded in `unexpected`. The server is bounded: it answers at
most `max_requests` requests (then 503) and shuts itself down after `lifetime_s`, so a client stuck
in a retry loop cannot hang the test run. `reject_token` makes every API call answer 401 with a
message that quotes the token, to check that rioquant masks it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import yaml


@dataclass
class HubState:
    repos: dict[str, dict] = field(default_factory=dict)  # repo id → {"private": bool, "branches": {name: {path: bytes}}}
    lfs: dict[str, bytes] = field(default_factory=dict)  # oid → bytes
    commits: list[dict] = field(default_factory=list)  # {"repo", "revision", "summary", "paths"}
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Authorization)
    unexpected: list[str] = field(default_factory=list)
    cards: list[dict] = field(default_factory=list)  # README front matters validated
    downloads: list[str] = field(default_factory=list)  # paths of whole-file GETs under /resolve/ (no Range)


class HubDouble:
    def __init__(self, max_requests: int = 200, lifetime_s: float = 120.0, reject_token: bool = False) -> None:
        self.state = HubState()
        self.max_requests = max_requests
        self.reject_token = reject_token
        self.lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status: int, payload: object = None, extra: dict | None = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                body = self._body()
                with double.lock:
                    double.state.requests.append((method, self.path, self.headers.get("Authorization")))
                    over = len(double.state.requests) > double.max_requests
                if over:
                    self._reply(503, {"error": "request budget of the test double exhausted"})
                    threading.Thread(target=double.stop, daemon=True).start()
                    return
                if "/resolve/" in self.path:
                    self._send_file(method)
                    return
                parts = self.path.split("?")[0].strip("/").split("/")
                info = parts[:2] == ["api", "models"] and (len(parts) == 4 or len(parts) >= 6 and parts[4] == "revision")
                if method == "GET" and info:
                    with double.lock:
                        status, payload = double._model_info("/".join(parts[2:4]), unquote("/".join(parts[5:])) or "main")
                    self._reply(status, payload, {"X-Error-Code": "RevisionNotFound"} if status == 404 else None)
                    return
                if double.reject_token and self.path.startswith("/api/") and self.path != "/api/agent-harnesses":
                    auth = self.headers.get("Authorization", "")
                    self._reply(401, {"error": f"Invalid credentials in Authorization header: {auth}"},
                                {"X-Error-Message": f"Invalid token {auth.removeprefix('Bearer ')}"})
                    return
                with double.lock:
                    status, payload = double.route(method, self.path, body, self.headers)
                self._reply(status, payload)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_HEAD(self) -> None:
                self._handle("HEAD")

            def _send_file(self, method: str) -> None:
                with double.lock:
                    found = double.resolve(self.path)
                if found is None:
                    self._reply(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                    return
                commit, data = found
                if data is None:
                    self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    return
                etag = hashlib.sha256(data).hexdigest()
                body, status, extra = data, 200, {}
                ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                if method == "GET" and not ranged:
                    with double.lock:
                        double.state.downloads.append(unquote(self.path.split("?")[0]).rsplit("/", 1)[1])
                if ranged and method == "GET":
                    start, end = int(ranged[1]), min(int(ranged[2]), len(data) - 1)
                    body, status = data[start : end + 1], 206
                    extra["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                self.send_response(status)
                headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"',
                           "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes",
                           "Content-Length": str(len(body)), **extra}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if method == "GET":
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(lifetime_s, self.stop)
        self.timer.daemon = True
        self._stopped = False

    def __enter__(self) -> HubDouble:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    # -- serving a repository to download ---------------------------------------------------------
    def serve(self, repo: str, files: dict[str, bytes], revision: str = "main") -> str:
        """Publish `files` (path → bytes) as `repo` at `revision`; returns the revision's commit sha."""
        self.state.repos.setdefault(repo, {"private": False, "branches": {}})["branches"][revision] = dict(files)
        return self.commit_of(repo, revision)

    @staticmethod
    def commit_of(repo: str, revision: str) -> str:
        return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()

    def _branch(self, repo: str, revision: str) -> tuple[str, dict] | None:
        """(commit sha, files) of a branch name or a branch's commit sha."""
        for name, files in self.state.repos.get(repo, {}).get("branches", {}).items():
            if revision in (name, self.commit_of(repo, name)):
                return self.commit_of(repo, name), files
        return None

    def resolve(self, path: str) -> tuple[str, bytes | None] | None:
        """/{org}/{name}/resolve/{rev}/{file} → (commit, bytes or None when absent); None: no such revision."""
        org, name, _, rev, *rest = unquote(path.split("?")[0]).strip("/").split("/")
        branch = self._branch(f"{org}/{name}", rev)
        return None if branch is None else (branch[0], branch[1].get("/".join(rest)))

    def _model_info(self, repo: str, revision: str) -> tuple[int, object]:
        branch = self._branch(repo, revision)
        if branch is None:
            return 404, {"error": f"Invalid rev id: {revision}"}
        commit, files = branch
        siblings = [{"rfilename": path, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
                     **({"lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}}
                        if path.endswith(".safetensors") else {})} for path, data in sorted(files.items())]
        return 200, {"id": repo, "modelId": repo, "sha": commit, "private": False, "siblings": siblings}

    # -- the endpoints ------------------------------------------------------------------------
    def route(self, method: str, path: str, body: bytes, headers) -> tuple[int, object]:
        parts = path.split("?")[0].strip("/").split("/")
        if method == "POST" and path.startswith("/api/repos/create"):
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo in self.state.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
            private = req.get("visibility") == "private" or bool(req.get("private"))  # hub 2.x sends visibility
            self.state.repos[repo] = {"private": private, "branches": {"main": {}}}
            return 200, {"url": f"{self.url}/{repo}"}
        if method == "GET" and path == "/api/agent-harnesses":
            return 200, {"standardEnvVars": [], "harnesses": {}}
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                head = content.split("---\n")[1] if content.startswith("---\n") else ""
                meta = yaml.safe_load(head)
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": str(err)}]}
            if not isinstance(meta, dict):
                return 400, {"errors": [{"message": "no YAML front matter"}]}
            self.state.cards.append(meta)
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, action, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            if repo not in self.state.repos:
                return 404, {"error": "Repository not found"}
            if action == "branch":
                self.state.repos[repo]["branches"].setdefault(rev, dict(self.state.repos[repo]["branches"]["main"]))
                return 200, {}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".gguf") else "regular",
                                        "shouldIgnore": False, "oid": None} for f in files]}
            if action == "commit":
                return self._commit(repo, rev, body)
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            return 200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}} for o in objects]}
        if method == "PUT" and parts[0] == "lfs-upload":
            oid = parts[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "oid does not match the uploaded bytes"}
            self.state.lfs[oid] = body
            return 200, {}
        self.state.unexpected.append(f"{method} {path}")
        return 404, {"error": f"the test double does not speak {method} {path}"}

    def _commit(self, repo: str, rev: str, body: bytes) -> tuple[int, object]:
        branch = self.state.repos[repo]["branches"].get(rev)
        if branch is None:
            return 404, {"error": f"Revision {rev} not found"}
        summary, paths = "", []
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                branch[value["path"]] = base64.b64decode(value["content"])
                paths.append(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return 400, {"error": f"LFS object {value['oid']} was never uploaded"}
                branch[value["path"]] = self.state.lfs[value["oid"]]
                paths.append(value["path"])
        oid = hashlib.sha1(body).hexdigest()
        self.state.commits.append({"repo": repo, "revision": rev, "summary": summary, "paths": sorted(paths)})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}


@contextmanager
def hub_double(monkeypatch, **limits) -> Iterator[HubDouble]:
    """A running double that this process's huggingface_hub talks to: HF_ENDPOINT is read at import, so
    the constants are patched (Xet off: the double speaks plain HTTP). Another process (a Ray worker)
    reaches it over localhost when given `url` as its endpoint."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_XET", True)
    with HubDouble(**limits) as double:
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", double.url)
        monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                            double.url + "/{repo_id}/resolve/{revision}/{filename}")
        yield double

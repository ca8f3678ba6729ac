"""A TEST DOUBLE of the Hugging Face Hub's HTTP API, served on loopback.

The Hub cannot be reached from here, so tests point HF_ENDPOINT at this small stand-in. It
answers the requests huggingface_hub 1.x makes to check a token, create a model repo and
upload a folder, with the Hub's request and response shapes:

    GET  /api/whoami-v2                          the user of the token
    POST /api/repos/create                       409 when the repo exists (create_repo(exist_ok=True) passes)
    POST /api/validate-yaml                      the card's front matter, parsed by huggingface_hub's own parser
    GET  /api/models/{ns}/{name}[/revision/{rev}] repo info: `sha` of the branch head
    POST /api/models/{ns}/{name}/preupload/{rev} per file: uploadMode and `oid` of the stored copy, which is
                                                 how huggingface_hub skips files that did not change
    POST /api/models/{ns}/{name}/commit/{rev}    NDJSON: a header, then files (base64) and deletions

Deviations from the Hub: every file is "regular" (sent inline, base64, in the commit), where
the Hub stores large and binary files in Xet storage, which this double does not implement;
its `validate-yaml` parses the card locally instead of applying the Hub's rules; one user,
one token, the main branch only. Every request is recorded (method, path, whether it carried
the token) with each commit's file list, so tests can assert what was uploaded.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USER = "alice"


def git_blob_oid(content: bytes) -> str:
    """The id git (and the Hub) gives a regular file: sha1 of 'blob <size>\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)  # {"oid", "message", "files", "deleted"}

    @property
    def head(self) -> str:
        return self.commits[-1]["oid"]

    def commit(self, message: str, files: dict[str, bytes], deleted: list[str]) -> str:
        self.files.update(files)
        for path in deleted:
            self.files.pop(path, None)
        oid = hashlib.sha1(json.dumps([self.repo_id, len(self.commits), message, sorted(files), deleted]).encode()).hexdigest()
        self.commits.append({"oid": oid, "message": message, "files": sorted(files), "deleted": deleted})
        return oid


@dataclass
class HubDouble:
    token: str
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def uploaded(self, repo_id: str) -> list[str]:
        """Every file path sent in a commit to repo_id, once per time it was sent (the initial .gitattributes aside)."""
        return [f for c in self.repos[repo_id].commits[1:] for f in c["files"]]


def _handler(hub: HubDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet: tests read hub.requests instead
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _route(self, method: str) -> None:
            path = self.path.split("?")[0]
            authorized = self.headers.get("Authorization") == f"Bearer {hub.token}"
            hub.requests.append({"method": method, "path": path, "authorized": authorized})
            body = self._body() if method == "POST" else b""
            if not authorized:
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/whoami-v2":
                return self._reply(200, {"type": "user", "name": USER, "auth": {"type": "access_token"}})
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request.get('organization') or USER}/{request['name']}"
                if repo_id in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                repo = hub.repos[repo_id] = Repo(repo_id, private=request.get("visibility") == "private")
                repo.commit("initial commit", {".gitattributes": b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"}, [])
                return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
            if path == "/api/validate-yaml":
                from huggingface_hub import ModelCard

                try:
                    ModelCard(json.loads(body)["content"], ignore_metadata_errors=False)
                except ValueError as err:
                    return self._reply(400, {"errors": [{"message": str(err)}]})
                return self._reply(200, {"errors": [], "warnings": []})
            parts = path.split("/")  # /api/models/<ns>/<name>[/<action>/<revision>]
            if len(parts) in (5, 7) and parts[:3] == ["", "api", "models"]:
                repo_id, action = f"{parts[3]}/{parts[4]}", (parts[5] if len(parts) == 7 else "revision")
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._reply(404, {"error": "Repository not found"})
                if action == "revision" and method == "GET":
                    return self._reply(200, {"id": repo_id, "sha": repo.head, "private": repo.private})
                if action == "preupload" and method == "POST":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": git_blob_oid(repo.files[f["path"]]) if f["path"] in repo.files else None}
                        for f in files]})
                if action == "commit" and method == "POST":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    header = next(item["value"] for item in lines if item["key"] == "header")
                    files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                             for item in lines if item["key"] == "file"}
                    unsupported = [item["key"] for item in lines if item["key"] not in ("header", "file", "deletedFile")]
                    if unsupported:
                        return self._reply(400, {"error": f"the test double does not support {unsupported}"})
                    deleted = [item["value"]["path"] for item in lines if item["key"] == "deletedFile"]
                    oid = repo.commit(header["summary"], files, deleted)
                    return self._reply(200, {"commitOid": oid, "commitUrl": f"{hub.url}/{repo_id}/commit/{oid}",
                                             "success": True})
            return self._reply(404, {"error": f"the test double does not serve {method} {path}"})

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

    return Handler


class serve:  # noqa: N801 - used as `with serve(token) as hub:`
    """Run a HubDouble on a free loopback port for the duration of a `with` block."""

    def __init__(self, token: str) -> None:
        self.hub = HubDouble(token)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.hub))
        self.hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubDouble:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

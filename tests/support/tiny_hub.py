"""A small Hugging Face Hub look-alike on 127.0.0.1, for testing private and gated adapters.

It serves just the part of the Hub API that `huggingface_hub` uses for `auth_check`,
`model_info`/`repo_info`, `list_repo_tree` and `snapshot_download` of one-commit repos, and
answers unauthorised requests the way the Hub does:

- private repo, no token: 401 with ``X-Error-Code: RepoNotFound`` (the Hub hides private repos);
- gated repo, no token: 401 ``GatedRepo``; token without access: 403 ``GatedRepo``;
- a token the Hub does not know: 401 "Invalid credentials in Authorization header";
- unknown repo: 404 ``RepoNotFound``; unknown revision: 404 ``RevisionNotFound``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)"
    r"(?:/(?P<action>revision|tree)/(?P<rev>[^/]+)(?:/.*)?|/(?P<auth>auth-check))?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class HubRepo:
    files: dict[str, bytes]
    access_tokens: frozenset[str] = frozenset()
    """Tokens allowed to read the repo; empty = public."""
    gated: bool = False
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for path, data in sorted(self.files.items()):
            digest.update(path.encode() + b"\0" + data)
        self.sha = digest.hexdigest()


class TinyHub:
    """Run with ``with TinyHub(repos, known_tokens) as hub: ... hub.url ...``."""

    def __init__(self, repos: dict[str, HubRepo], known_tokens: set[str]) -> None:
        self.repos = repos
        self.known_tokens = known_tokens
        self.requests: list[tuple[str, str, str | None]] = []
        """(method, path, bearer token) of every request served."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> TinyHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(send_body=False)

            def do_GET(self) -> None:
                self._serve(send_body=True)

            def _serve(self, send_body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                authorization = self.headers.get("Authorization", "")
                token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else None
                hub.requests.append((self.command, path, token))
                api, resolve = _API.match(path), _RESOLVE.match(path)
                match = api or resolve
                if match is None:
                    return self._error(404, None, "no such route", send_body)
                repo = hub.repos.get(match["repo"])
                if repo is None:
                    return self._error(404, "RepoNotFound", "repository not found", send_body)
                if token is not None and token not in hub.known_tokens:
                    return self._error(401, None, "Invalid credentials in Authorization header", send_body)
                if repo.access_tokens and token not in repo.access_tokens:
                    if repo.gated:
                        status = 403 if token else 401
                        return self._error(status, "GatedRepo", "access to this repo is restricted", send_body)
                    return self._error(401 if token is None else 404, "RepoNotFound", "repository not found", send_body)
                revision = match["rev"]
                if revision is not None and revision not in ("main", repo.sha):
                    return self._error(404, "RevisionNotFound", "invalid revision", send_body)
                if resolve is not None:
                    return self._file(repo, resolve["path"], send_body)
                if api["auth"]:
                    return self._json({}, send_body)
                if api["action"] == "tree":
                    tree = [
                        {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for p, d in sorted(repo.files.items())
                    ]
                    return self._json(tree, send_body)
                info = {
                    "id": match["repo"], "modelId": match["repo"], "sha": repo.sha, "private": bool(repo.access_tokens),
                    "gated": "manual" if repo.gated else False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)],
                }
                return self._json(info, send_body)

            def _file(self, repo: HubRepo, path: str, send_body: bool) -> None:
                data = repo.files.get(path)
                if data is None:
                    return self._error(404, "EntryNotFound", "entry not found", send_body)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", repo.sha)
                self.end_headers()
                if send_body:
                    self.wfile.write(data)

            def _json(self, payload, send_body: bool) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def _error(self, status: int, code: str | None, message: str, send_body: bool) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                if code is not None:
                    self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

        return Handler

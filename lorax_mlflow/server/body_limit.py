"""A request body limit enforced before anything parses the body: 413 above it.

A declared ``Content-Length`` over the limit is answered before one byte of the body is read; a
chunked body is counted as it arrives and refused as soon as it passes the limit, so an oversized
request never costs more than the limit in memory or parsing time. (Starlette's own limit answers
in plain text; this one answers in the route family's error shape.)
"""

from __future__ import annotations

import os

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_REQUEST_BYTES = 4 << 20
ENV_VAR = "LORAX_MAX_REQUEST_BYTES"


def resolve_max_request_bytes(configured: int | None = None) -> int:
    """`configured`, else ``LORAX_MAX_REQUEST_BYTES``, else 4 MiB."""
    if configured is not None:
        return configured
    raw = os.environ.get(ENV_VAR)
    return int(raw) if raw else DEFAULT_MAX_REQUEST_BYTES


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            from lorax_mlflow.server.errors import error_response, http_error

            await error_response(Request(scope), http_error(self._too_large()))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # FastAPI re-raises HTTPExceptions; the app's handler answers
            return message

        await self.app(scope, limited_receive, send)

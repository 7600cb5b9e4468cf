"""Run one HTTP request through an ASGI app in this process, streaming the response out.

A Ray Serve replica answers the requests its ingress forwards by running them through the very
FastAPI app that `lorax-mlflow serve` serves, so every route, error shape and stream behaves the
same; this is the smallest ASGI client that keeps a response streaming (httpx's ASGI transport
buffers whole bodies).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class HttpRequest:
    """A request as the ingress forwards it (plain data: it crosses process boundaries)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class HttpResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]


async def call_asgi(app, request: HttpRequest) -> AsyncIterator[HttpResponseStart | bytes]:
    """Yield the response start, then its body chunks as the app sends them.

    Closing the iterator early (the client went away) disconnects the app's request, so a
    streaming route aborts its engine request exactly as it does behind uvicorn.
    """
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": request.method, "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query_string, "root_path": "", "headers": request.headers,
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }
    sent: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield HttpResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        try:
            await task
        except Exception:  # already answered (Starlette re-raises after sending its 500)
            logger.exception("%s %s failed", request.method, request.path)
    finally:
        disconnected.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)
            except (asyncio.TimeoutError, Exception):
                task.cancel()

"""Small pieces every route family uses: the bearer token, and preparing a request off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from lorax_mlflow.errors import LoraxError

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25


class ClientDisconnectedError(LoraxError):
    """The client went away before its (non-streaming) response was ready: nobody gets this answer."""

    status = 499
    code = "client_closed_request"


def bearer_token(request: Request) -> str | None:
    """`Authorization: Bearer <token>`, the api_token for private adapters (the OpenAI SDK always sends one)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def off_loop(function: Callable[..., T], *args, **kwargs) -> T:
    """Run blocking work (tokenising, adapter resolution, grammar compilation) in the thread pool."""
    return await run_in_threadpool(function, *args, **kwargs)


def running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def unless_disconnected(request: Request, awaitable: Awaitable[T],
                              on_disconnect: Callable[[], None] | None = None) -> T:
    """Await `awaitable` while polling for the client's disconnect; on one, cancel it (which aborts its
    engine requests, freeing their sequences and KV blocks at once) and raise ClientDisconnectedError.

    Work on a thread cannot be cancelled from here: `on_disconnect` is called first to stop it
    (a CancelScope's cancel), and the thread is then awaited."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnectedError("the client disconnected before the response was ready")
    finally:
        if not task.done():
            if on_disconnect is not None:
                on_disconnect()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

"""Small pieces every route family uses: the bearer token, and preparing a request off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


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

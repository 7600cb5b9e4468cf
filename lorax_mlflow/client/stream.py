"""The channel between the engine thread and one caller, sync or asyncio."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator

from lorax_mlflow.engine.outputs import RequestOutput
from lorax_mlflow.errors import LoraxError


class RequestStream:
    """Receives RequestOutput snapshots (and at most one error) for one request.

    The engine thread calls :meth:`put`; the caller iterates (``for`` or ``async for``). Leaving
    the iteration early, or calling :meth:`abort`, aborts the request in the engine so its KV
    blocks and adapter slot are released at once.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None], loop: asyncio.AbstractEventLoop | None = None):
        self.request_id = request_id
        self._abort = abort
        self._loop = loop
        self._queue: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self.finished = False

    def put(self, item: RequestOutput | LoraxError) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                self._abort(self.request_id)
        else:
            self._queue.put(item)

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)

    def _accept(self, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        assert self._loop is None, "this stream was created for asyncio: use `async for`"
        try:
            while not self.finished:
                yield self._accept(self._queue.get())
        finally:
            self.abort()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        assert self._loop is not None, "this stream was created without an event loop: use `for`"
        try:
            while not self.finished:
                yield self._accept(await self._queue.get())
        finally:
            self.abort()

    def result(self) -> RequestOutput:
        """Block until the request finishes and return its final output."""
        last = None
        for last in self:
            pass
        if last is None:
            raise LoraxError("the request was aborted before it produced anything", code="aborted")
        return last

    async def aresult(self) -> RequestOutput:
        last = None
        async for last in self:
            pass
        if last is None:
            raise LoraxError("the request was aborted before it produced anything", code="aborted")
        return last

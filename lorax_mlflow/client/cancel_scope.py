"""Aborting requests started by code that cannot be handed a stream: MLflow's pyfunc ``predict``.

The HTTP server runs ``/invocations`` through the pyfunc wrapper, which calls
``LoraxChatModel.predict`` on a worker thread with no way to pass anything else along. The route
runs that call inside a :class:`CancelScope`; every stream :meth:`LoraxService.submit` starts
meanwhile on that thread joins the scope, and :meth:`CancelScope.cancel` (the client disconnected)
aborts them all, which frees their sequences and KV blocks and wakes the blocked ``predict``.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

from lorax_mlflow.client.stream import RequestStream

T = TypeVar("T")

_current: contextvars.ContextVar[CancelScope | None] = contextvars.ContextVar("lorax_cancel_scope", default=None)


class CancelScope:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list[RequestStream] = []
        self.cancelled = False

    def run(self, function: Callable[..., T], *args) -> T:
        """Call `function` with this scope current (on the calling thread)."""
        token = _current.set(self)
        try:
            return function(*args)
        finally:
            _current.reset(token)

    def cancel(self) -> None:
        """Abort every stream started in this scope, and any started in it from now on."""
        with self._lock:
            self.cancelled = True
            streams, self._streams = self._streams, []
        for stream in streams:
            stream.abort()

    def _join(self, stream: RequestStream) -> None:
        with self._lock:
            if not self.cancelled:
                self._streams.append(stream)
                return
        stream.abort()


def join_current_scope(stream: RequestStream) -> RequestStream:
    """Put `stream` under the current CancelScope, if there is one (a no-op otherwise)."""
    scope = _current.get()
    if scope is not None:
        scope._join(stream)
    return stream

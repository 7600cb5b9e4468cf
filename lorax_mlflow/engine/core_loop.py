"""The loop that drives an EngineCore: take new requests and aborts, step while there is work, emit.

The same loop runs on the core process's main thread (lorax_mlflow/engine/core_process.py) and,
in the in-process mode for tests and debugging, on a thread of the caller's process.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from lorax_mlflow.engine.core import EngineCore
from lorax_mlflow.engine.messages import AbortRequest, AddRequest, EngineCoreOutputs, RequestDelta
from lorax_mlflow.errors import LoraxError

logger = logging.getLogger(__name__)

_ADAPTER_WAIT_S = 0.002
"""How long to sleep when the only requests left wait for adapter loads."""


class CoreLoop:
    def __init__(self, core: EngineCore, emit: Callable[[EngineCoreOutputs], None]) -> None:
        self.core = core
        self._emit = emit
        self._inbox: queue.SimpleQueue[AddRequest | AbortRequest] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()

    def put(self, message: AddRequest | AbortRequest) -> None:
        """Hand a message to the loop (any thread)."""
        self._inbox.put(message)
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        """Run until :meth:`stop`. A failure inside a step fails the requests of that step, never the loop."""
        while not self._stop.is_set():
            rejected = self._drain_inbox()
            if rejected:
                self._emit(EngineCoreOutputs(time.time(), rejected))
            if not self.core.has_work:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs, ran = self.core.step()
            except Exception as error:  # a bug or an OOM in one step must not take the engine down
                logger.exception("engine step failed")
                outputs, ran = self.core.fail_running(
                    LoraxError(f"internal error during generation: {error}", code="internal_error")), True
            if outputs.requests:
                self._emit(outputs)
            if not ran:
                self._wake.wait(_ADAPTER_WAIT_S)
                self._wake.clear()

    def _drain_inbox(self) -> list[RequestDelta]:
        rejected = []
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return rejected
            if isinstance(message, AddRequest):
                failure = self.core.add_request(message)
                if failure is not None:
                    rejected.append(failure)
            else:
                self.core.abort_request(message.request_id, message.indices)

"""The client's end of the engine core process: start it, talk to it over ZeroMQ, notice when it dies.

Messages are msgspec structs in msgpack (lorax_mlflow/engine/messages.py). One receiver thread
reads the core's per-step output batches and hands them to the output processor; callers' threads
send requests and aborts (one lock serialises the socket). If the process dies, every request in
flight fails with EngineUnavailableError (503) and :attr:`alive` turns False; the engine client
starts a new core on the next request.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import zmq

from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.core_process import run_core_process
from lorax_mlflow.engine.messages import (
    AbortRequest, AddRequest, CoreMessage, EngineCoreOutputs, EngineInfo, LoadFailed, Ready, Shutdown,
    UtilityCall, UtilityResult,
)
from lorax_mlflow.errors import EngineUnavailableError

logger = logging.getLogger(__name__)

_READY_POLL_MS = 500
_SHUTDOWN_WAIT_S = 10


class CoreLoadError(RuntimeError):
    """The engine core process could not load the model (the message says why)."""


class CoreProcess:
    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig,
        *,
        named_adapters: dict[str, str | Path],
        base_model_name: str | None,
        on_outputs: Callable[[EngineCoreOutputs], None],
        on_death: Callable[[EngineUnavailableError], None],
    ) -> None:
        self._on_outputs = on_outputs
        self._on_death = on_death
        self._dir = tempfile.TemporaryDirectory(prefix="lorax-core-")
        self._context = zmq.Context()
        input_address = f"ipc://{self._dir.name}/input"
        output_address = f"ipc://{self._dir.name}/output"
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(output_address)
        self._send_lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._closing = False
        self.death: EngineUnavailableError | None = None
        spec = {
            "model_path": str(model_path),
            "config": config.to_dict(),
            "named_adapters": {name: str(path) for name, path in named_adapters.items()},
            "base_model_name": base_model_name,
            "log_level": logging.getLogger("lorax_mlflow").getEffectiveLevel(),
        }
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_core_process, args=(spec, input_address, output_address, os.getpid()),
            name="lorax-engine-core", daemon=True,
        )
        self.process.start()
        atexit.register(self.shutdown)  # before multiprocessing's own exit handler terminates the core
        self.info: EngineInfo | None = None
        self._receiver: threading.Thread | None = None

    def wait_ready(self) -> EngineInfo:
        """Block until the core has loaded the model (start the receiver), or raise why it could not."""
        try:
            self.info = self._wait_ready()
        except BaseException:
            self._close_sockets()
            if self.process.is_alive():
                self.process.kill()
            raise
        self._receiver = threading.Thread(target=self._receive_loop, name="lorax-core-output", daemon=True)
        self._receiver.start()
        return self.info

    def _wait_ready(self) -> EngineInfo:
        """Block until the core reports Ready, or raise with its load error or its exit code."""
        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        while True:
            if poller.poll(_READY_POLL_MS):
                message = self._decoder.decode(self._output.recv())
                if isinstance(message, Ready):
                    logger.info("engine core process %d ready", self.process.pid)
                    return message.info
                if isinstance(message, LoadFailed):
                    self.process.join(timeout=_SHUTDOWN_WAIT_S)
                    raise CoreLoadError(f"the engine core failed to load the model: {message.message}")
            elif not self.process.is_alive():
                raise CoreLoadError(
                    f"the engine core process exited while loading the model (exit code {self.process.exitcode})")

    @property
    def alive(self) -> bool:
        return self.death is None and self.process.is_alive()

    # ----- callers' threads -------------------------------------------------------------------
    def _send(self, message: Any) -> None:
        frame = self._encoder.encode(message)
        with self._send_lock:
            if self.death is not None:
                raise self.death
            self._input.send(frame, copy=False)

    def add(self, message: AddRequest) -> None:
        self._send(message)

    def abort(self, request_id: str, indices: list[int] | None = None) -> None:
        if self.death is None:
            self._send(AbortRequest(request_id, indices))

    def call(self, method: str, *args: Any) -> Any:
        """Run one of the core's utility methods and return its result (raises its LoraxError)."""
        future: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        try:
            self._send(UtilityCall(call_id, method, list(args)))
            return future.result()
        finally:
            self._calls.pop(call_id, None)

    def shutdown(self) -> None:
        atexit.unregister(self.shutdown)
        self._closing = True
        if self.process.is_alive():
            try:
                self._send(Shutdown())
            except EngineUnavailableError:
                pass
            self.process.join(timeout=_SHUTDOWN_WAIT_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=_SHUTDOWN_WAIT_S)
        if self._receiver is not None:
            self._receiver.join(timeout=_SHUTDOWN_WAIT_S)

    # ----- receiver thread --------------------------------------------------------------------
    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._output, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._output in events:
                self._handle(self._decoder.decode(self._output.recv()))
                continue  # drain what the core sent before looking at its exit
            if self.process.sentinel in events:
                break
        self._died()

    def _handle(self, message: CoreMessage) -> None:
        if isinstance(message, EngineCoreOutputs):
            self._on_outputs(message)
        elif isinstance(message, UtilityResult):
            future = self._calls.get(message.call_id)
            if future is None:
                return
            if message.error is not None:
                future.set_exception(message.error.to_error())
            elif message.failure is not None:
                future.set_exception(RuntimeError(f"engine core: {message.failure}"))
            else:
                future.set_result(message.result)

    def _died(self) -> None:
        self.process.join(timeout=1)
        if self._closing:
            error = EngineUnavailableError("the engine was shut down")
        else:
            error = EngineUnavailableError(
                f"the engine core process died (exit code {self.process.exitcode}); requests in flight failed")
            logger.error("%s", error.message)
        with self._send_lock:
            self.death = error
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(error)
        self._on_death(error)
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._send_lock:
            self._input.close()
            self._output.close()
            self._context.term()
        self._dir.cleanup()

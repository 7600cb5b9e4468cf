"""The engine core process: its main thread runs the step loop with all the torch threads it is given.

Started by the client (lorax_mlflow/client/core_process_handle.py) with the 'spawn' start method and
plain data only (the config as a dict, paths as strings, two socket addresses). Two small threads
move bytes: one receives client messages (msgspec structs, never pickles) and hands adds and aborts
to the loop, running utility calls (adapter resolution, which may download, and stats) on a worker
pool; one sends what the loop and the utility calls produce, so encoding stays off the socket's
critical path. The process exits when its parent dies, even by SIGKILL: a watchdog thread waits
on the parent's sentinel (a pipe that closes with the parent) and checks the parent pid.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import zmq

from lorax_mlflow.engine.messages import (
    AbortRequest, AddRequest, ClientMessage, LoadFailed, Ready, Shutdown, UtilityCall, UtilityResult, WireError,
)
from lorax_mlflow.errors import LoraxError
from lorax_mlflow.redact import install_log_redaction

logger = logging.getLogger(__name__)

_PARENT_POLL_S = 0.5


def run_core_process(spec: dict[str, Any], input_address: str, output_address: str, parent_pid: int) -> None:
    """Entry point of the core process (the target of the spawned multiprocessing.Process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it tells us to stop
    logging.basicConfig(level=spec.get("log_level", logging.WARNING),
                        format="%(asctime)s %(levelname)s core %(name)s: %(message)s")
    install_log_redaction()  # adapter requests carry hub tokens into this process too
    _exit_with_parent(parent_pid)
    context = zmq.Context()
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    sender = threading.Thread(target=_send_loop, args=(context, output_address, outbox), name="core-output",
                              daemon=True)
    sender.start()
    encoder = msgspec.msgpack.Encoder()
    try:
        core = _build_core(spec)
    except BaseException as error:  # noqa: BLE001 - every load failure is reported, then we exit
        logger.exception("engine core failed to load")
        message = error.message if isinstance(error, LoraxError) else f"{type(error).__name__}: {error}"
        outbox.put(encoder.encode(LoadFailed(message)))
        outbox.put(None)
        sender.join(timeout=5)
        return

    from lorax_mlflow.engine.core_loop import CoreLoop

    loop = CoreLoop(core, lambda outputs: outbox.put(encoder.encode(outputs)))
    receiver = threading.Thread(target=_receive_loop, args=(context, input_address, core, loop, outbox),
                                name="core-input", daemon=True)
    receiver.start()
    outbox.put(encoder.encode(Ready(core.info())))
    try:
        loop.run()
    finally:
        core.shutdown()
        outbox.put(None)
        sender.join(timeout=5)


def _build_core(spec: dict[str, Any]):
    import torch

    from lorax_mlflow.engine.config import EngineConfig
    from lorax_mlflow.engine.core import EngineCore

    config = EngineConfig.from_dict(spec["config"])
    threads = config.resolved_num_threads()
    torch.set_num_threads(threads)
    logger.info("engine core: pid %d, %d torch threads", os.getpid(), threads)
    return EngineCore(spec["model_path"], config, named_adapters=spec["named_adapters"],
                      base_model_name=spec["base_model_name"])


def _exit_with_parent(parent_pid: int) -> None:
    import multiprocessing

    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None

    def watch() -> None:
        from multiprocessing.connection import wait

        while True:
            if sentinel is not None and wait([sentinel], timeout=_PARENT_POLL_S):
                break
            if os.getppid() != parent_pid:
                break
            if sentinel is None:
                time.sleep(_PARENT_POLL_S)
        os._exit(0)  # no cleanup to wait for: the memory goes back with the process

    threading.Thread(target=watch, name="core-parent-watch", daemon=True).start()


def _send_loop(context: zmq.Context, address: str, outbox: queue.SimpleQueue) -> None:
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 2000)
    socket.connect(address)
    while True:
        frame = outbox.get()
        if frame is None:
            break
        socket.send(frame, copy=False)
    socket.close()


def _receive_loop(context: zmq.Context, address: str, core, loop, outbox: queue.SimpleQueue) -> None:
    socket = context.socket(zmq.PULL)
    socket.connect(address)
    decoder = msgspec.msgpack.Decoder(ClientMessage)
    encoder = msgspec.msgpack.Encoder()
    workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="core-utility")

    def answer(call: UtilityCall) -> None:
        try:
            result = UtilityResult(call.call_id, core.utility(call.method, call.args))
        except LoraxError as error:
            result = UtilityResult(call.call_id, error=WireError.of(error))
        except Exception as error:  # noqa: BLE001 - reported to the caller, the core goes on
            logger.exception("utility call %s failed", call.method)
            result = UtilityResult(call.call_id, failure="".join(traceback.format_exception_only(error)).strip())
        outbox.put(encoder.encode(result))

    while True:
        try:
            message = decoder.decode(socket.recv())
        except msgspec.DecodeError:
            logger.error("dropped a message that does not decode")
            continue
        if isinstance(message, (AddRequest, AbortRequest)):
            loop.put(message)
        elif isinstance(message, UtilityCall):
            workers.submit(answer, message)
        elif isinstance(message, Shutdown):
            loop.stop()
            return

"""The in-process mode: the engine core and its loop on a thread of this process (tests, debugging).

Same interface as the core process (lorax_mlflow/client/core_process.py); no IPC, no pickling.
Its loop thread shares this process's GIL and OpenMP pool with every caller, which is what the
process split exists to avoid: use it where start-up time matters more than throughput.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.core import EngineCore
from lorax_mlflow.engine.core_loop import CoreLoop
from lorax_mlflow.engine.messages import AbortRequest, AddRequest, EngineCoreOutputs, EngineInfo


class InProcessCore:
    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig,
        *,
        named_adapters: dict[str, str | Path],
        base_model_name: str | None,
        on_outputs: Callable[[EngineCoreOutputs], None],
    ) -> None:
        self.core = EngineCore(model_path, config, named_adapters=named_adapters, base_model_name=base_model_name)
        self.info: EngineInfo = self.core.info()
        self._num_threads = config.resolved_num_threads()
        self._loop = CoreLoop(self.core, on_outputs)
        self._thread = threading.Thread(target=self._run, name="lorax-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        self._loop.run()

    def wait_ready(self) -> EngineInfo:
        return self.info

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, message: AddRequest) -> None:
        self._loop.put(message)

    def abort(self, request_id: str, indices: list[int] | None = None) -> None:
        if threading.current_thread() is self._thread:  # from the output processor, inside the loop
            self.core.abort_request(request_id, indices)
        else:
            self._loop.put(AbortRequest(request_id, indices))

    def call(self, method: str, *args: Any) -> Any:
        return self.core.utility(method, list(args))

    def shutdown(self) -> None:
        self._loop.stop()
        self._thread.join(timeout=10)
        self.core.shutdown()

"""Start the real server (uvicorn, in a background thread of the test process) on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

import lorax_mlflow
from tests.mlflow_support import TINY_ENGINE
from lorax_mlflow.server import ServedModel, create_app, load_served_model
from lorax_mlflow.server.model_source import ModelSource



@dataclass
class RunningServer:
    url: str
    app: object

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@contextmanager
def running_server(source: ModelSource, *, uvicorn_options: dict | None = None, **app_options) -> Iterator[RunningServer]:
    options = {"log_level": "warning", **(uvicorn_options or {})}
    config = uvicorn.Config(create_app(source, **app_options), host="127.0.0.1", port=0, lifespan="on", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", config.app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_healthy(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/health").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError("the server did not become healthy")


def save_tiny_model(folder: Path, tiny_model_dir: Path, tiny_adapters: dict[str, Path], adapter_root: Path) -> Path:
    """The tiny Llama with adapters "a" and "b" packaged by name; "c" reachable by path under the root."""
    path = folder / "tiny-chat-model"
    lorax_mlflow.save_model(
        path,
        base_model=str(tiny_model_dir),
        adapters={"a": tiny_adapters["a"], "b": tiny_adapters["b"]},
        adapter_roots=[adapter_root],
        engine_config={**TINY_ENGINE, "kv_cache_bytes": 4 << 20},
    )
    return path


def load_tiny_model(path: Path) -> ServedModel:
    return load_served_model(str(path))

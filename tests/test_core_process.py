"""The engine core in its own process: lifecycle (parent death, core death) and concurrency through the surfaces."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from lorax_mlflow.chat_model import unwrap_chat_model
from tests.server_support import running_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QUESTIONS = ["Tell me about the sea", "What is a cat?", "Count to three", "Hello!"]
ADAPTERS = ["", "a", "b"]


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (its memory is already released)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state


def _wait_exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def model(model_path):
    """The tiny model loaded through MLflow, its engine core in its own process."""
    loaded = mlflow.pyfunc.load_model(str(model_path))
    yield loaded
    unwrap_chat_model(loaded).service.engine.shutdown()


def _request(index: int) -> dict:
    return {"messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}], "max_tokens": 10,
            "temperature": 0, "custom_inputs": {"adapter_id": ADAPTERS[index % len(ADAPTERS)]}}


def test_the_engine_core_runs_in_its_own_process(model):
    engine = unwrap_chat_model(model).service.engine
    assert engine.core is None
    assert engine._connection.process.pid != os.getpid()
    assert engine.alive


def test_64_concurrent_predict_calls_from_threads_equal_one_at_a_time(model):
    distinct = len(QUESTIONS) * len(ADAPTERS)
    alone = [model.predict(_request(i))["choices"][0]["message"]["content"] for i in range(distinct)]
    results: list[str | None] = [None] * 64

    def call(i: int) -> None:
        results[i] = model.predict(_request(i))["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [alone[i % distinct] for i in range(64)]


def test_64_concurrent_http_streams_equal_one_at_a_time(model):
    served = _served(model)
    with running_server(served) as server:
        def body(i: int) -> dict:
            request = _request(i)
            return {"model": request["custom_inputs"]["adapter_id"] or "", "messages": request["messages"],
                    "max_tokens": 10, "temperature": 0, "stream": True}

        async def stream(client: httpx.AsyncClient, i: int) -> str:
            text = []
            async with client.stream("POST", server.v1 + "/chat/completions", json=body(i)) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        text.extend(c["delta"].get("content") or "" for c in chunk["choices"])
            return "".join(text)

        async def run() -> tuple[list[str], list[str]]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                distinct = len(QUESTIONS) * len(ADAPTERS)
                alone = [await stream(client, i) for i in range(distinct)]
                together = await asyncio.gather(*(stream(client, i) for i in range(64)))
                return [alone[i % distinct] for i in range(64)], list(together)

        expected, got = asyncio.run(run())
    assert got == expected


def _served(model):
    from lorax_mlflow.server import ServedModel

    return ServedModel(unwrap_chat_model(model).service, model.predict)


def test_a_core_killed_mid_stream_ends_the_stream_with_an_error_and_the_next_request_restarts_it(model):
    engine = unwrap_chat_model(model).service.engine
    with running_server(_served(model)) as server:
        body = {"model": "a", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 200,
                "temperature": 0, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line)
            events.append(next(lines))
            os.kill(engine._connection.process.pid, signal.SIGKILL)
            events.extend(lines)
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][6:])["error"]
        assert error["code"] == "engine_unavailable" and "died" in error["message"]
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "engine_down"

        answer = httpx.post(server.v1 + "/chat/completions", timeout=120, json={
            "model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert httpx.get(server.url + "/health").status_code == 200
        assert engine.alive


PARENT = textwrap.dedent("""
    import sys, time
    from lorax_mlflow.client.engine_client import EngineClient
    from lorax_mlflow.engine.config import EngineConfig

    if __name__ == "__main__":
        client = EngineClient(sys.argv[1], EngineConfig(kv_cache_bytes=4 << 20, max_model_len=128, num_threads=1))
        print(client._connection.process.pid, flush=True)
        time.sleep(600)
""")


def test_the_core_exits_within_seconds_when_its_parent_is_sigkilled(tiny_model_dir, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        core_pid = int(parent.stdout.readline())
        assert not _exited(core_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _wait_exited(core_pid, timeout=10), "the core outlived its parent"
    finally:
        parent.kill()
        parent.wait()

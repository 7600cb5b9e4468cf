"""The MLflow round trip: save -> load -> predict / predict_stream, and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import mlflow
import pytest
from mlflow.exceptions import MlflowException

import lorax_mlflow
from lorax_mlflow.api.chat_request import mlflow_chat_request
from lorax_mlflow.chat_model import unwrap_chat_model
from tests.mlflow_support import TINY_ENGINE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir, tiny_adapters, adapter_root):
    path = tmp_path_factory.mktemp("saved") / "chat-model"
    lorax_mlflow.save_model(
        path,
        base_model=str(tiny_model_dir),
        adapters={"support": tiny_adapters["a"], "sales": tiny_adapters["b"]},
        adapter_roots=[adapter_root],
        engine_config=TINY_ENGINE,
    )
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return mlflow.pyfunc.load_model(str(model_dir))


def chat(content: str, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0, **extra}


def test_predict_returns_an_openai_shaped_chat_completion(model):
    response = model.predict(chat("hi", custom_inputs={"adapter_id": "support"}))
    assert response["object"] == "chat.completion"
    choice = response["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = response["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert response["model"] == "support"


def test_predict_with_a_named_adapter_equals_the_engine_run_with_that_adapter_folder(model, tiny_adapters):
    chat_model = unwrap_chat_model(model)
    service = chat_model.service
    via_mlflow = model.predict(chat("Tell me a story", custom_inputs={"adapter_id": "sales"}))
    prepared = mlflow_chat_request(service, {**chat("Tell me a story"), "adapter_id": str(tiny_adapters["b"])})
    direct = service.submit(prepared).result().outputs[0].text
    assert via_mlflow["choices"][0]["message"]["content"] == direct
    base = model.predict(chat("Tell me a story"))
    assert base["choices"][0]["message"]["content"] != direct


def test_local_adapter_under_the_roots_can_be_named_by_path(model, tiny_adapters):
    response = model.predict(chat("hi", custom_inputs={"adapter_id": str(tiny_adapters["c"])}))
    assert response["choices"][0]["finish_reason"] in ("stop", "length")


def test_predict_stream_yields_deltas_that_add_up_to_predict(model):
    request = chat("Count to five", custom_inputs={"adapter_id": "support", "ignore_eos": True})
    whole = model.predict(request)["choices"][0]["message"]["content"]
    chunks = list(model.predict_stream(request))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_concurrent_predict_calls_share_the_engine_batches(model):
    engine = unwrap_chat_model(model).service.engine
    steps_before = engine.stats().num_steps
    results = [None] * 6
    adapters = ["support", "sales", "", "support", "sales", ""]

    def call(i):
        results[i] = model.predict(chat(f"question {i}", custom_inputs={"adapter_id": adapters[i], "ignore_eos": True}))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["usage"]["completion_tokens"] == 12 for r in results)
    steps = engine.stats().num_steps - steps_before
    assert steps < 6 * 12, "requests from different threads ran in the same steps"


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (chat("hi", custom_inputs={"adapter_id": "nope/unknown-adapter-xyz"}), "not"),
        (chat("hi", max_tokens=0), "max_tokens"),
        (chat("hi", custom_inputs={"adapter_id": "/etc"}), "root"),
    ],
)
def test_bad_requests_raise_clear_mlflow_errors(model, request_body, message):
    with pytest.raises(MlflowException) as raised:
        model.predict(request_body)
    assert message in str(raised.value).lower()


def test_a_model_logged_by_a_newer_package_version_fails_at_load(model_dir, tmp_path):
    import shutil

    import yaml

    copy = tmp_path / "newer"
    shutil.copytree(model_dir, copy)
    mlmodel = yaml.safe_load((copy / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["config"]["lorax_mlflow_version"] = "99.0.0"
    (copy / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(Exception, match="newer than the installed"):
        mlflow.pyfunc.load_model(str(copy))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_chat_request_with_an_adapter(model_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    try:
        body = json.dumps(chat("hi", custom_inputs={"adapter_id": "support"})).encode()
        deadline = time.time() + 300  # the server and its engine core each load torch: slow on a busy machine
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.time() < deadline, "mlflow models serve did not come up"
                time.sleep(1)
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["model"] == "support"
    finally:
        proc.terminate()
        proc.wait(timeout=30)

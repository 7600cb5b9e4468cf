"""Runtime adapter management over HTTP (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter,
LoRAX-style preloading): off by default, admin token required when on."""

from __future__ import annotations

import httpx
import pytest

from lorax_mlflow.server.adapter_admin import preload_adapters
from tests.server_support import load_tiny_model, running_server, wait_healthy

TOKEN = "s3cret-admin"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
http = httpx.Client(timeout=60)


@pytest.fixture(scope="module")
def managed(model_path, tiny_adapters):
    """The tiny model served with management on and adapter "c" preloaded as "pre" by the loader."""
    def load():
        served = load_tiny_model(model_path)
        preload_adapters(served.service, {"pre": str(tiny_adapters["c"])})
        return served

    with running_server(load, admin_token=TOKEN) as running:
        wait_healthy(running.url)
        yield running
        running.app.state.holder.service.engine.shutdown()


def chat(server, model: str) -> httpx.Response:
    return http.post(server.v1 + "/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0})


def model_ids(server) -> set[str]:
    return {entry["id"] for entry in http.get(server.v1 + "/models").json()["data"]}


def test_management_routes_do_not_exist_unless_enabled(server, tiny_adapters):
    response = http.post(server.v1 + "/load_lora_adapter", headers=ADMIN,
                          json={"lora_name": "x", "lora_path": str(tiny_adapters["c"])})
    assert response.status_code == 404
    assert "x" not in model_ids(server)


def test_preloaded_adapter_is_served_once_health_is_ready(managed, tiny_adapters):
    assert "pre" in model_ids(managed)
    by_name, by_path = chat(managed, "pre"), chat(managed, str(tiny_adapters["c"]))
    assert by_name.status_code == 200
    assert by_name.json()["choices"][0]["message"] == by_path.json()["choices"][0]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_load_and_unload_are_refused_without_the_admin_token(managed, tiny_adapters, headers):
    load = http.post(managed.v1 + "/load_lora_adapter", headers=headers,
                      json={"lora_name": "sneaky", "lora_path": str(tiny_adapters["a"])})
    unload = http.post(managed.v1 + "/unload_lora_adapter", headers=headers, json={"lora_name": "pre"})
    assert load.status_code == unload.status_code == 401
    assert load.json()["error"]["code"] == "admin_unauthorized"
    assert "sneaky" not in model_ids(managed) and "pre" in model_ids(managed)


def test_load_serve_and_unload_an_adapter_at_runtime(managed, tiny_adapters):
    body = {"lora_name": "support", "lora_path": str(tiny_adapters["b"])}
    loaded = http.post(managed.v1 + "/load_lora_adapter", headers=ADMIN, json=body)
    assert loaded.status_code == 200 and "support" in loaded.text
    assert "support" in model_ids(managed)
    by_name, by_path = chat(managed, "support"), chat(managed, str(tiny_adapters["b"]))
    assert by_name.json()["choices"][0]["message"] == by_path.json()["choices"][0]["message"]
    merged = http.post(managed.v1 + "/chat/completions", timeout=60, json={
        "model": "", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
        "merged_adapters": {"ids": ["support", "b"], "weights": [0.5, 0.5]}})
    assert merged.status_code == 200, merged.text  # merge recipes may name runtime names too

    again = http.post(managed.v1 + "/load_lora_adapter", headers=ADMIN, json=body)
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_already_loaded"

    unloaded = http.post(managed.v1 + "/unload_lora_adapter", headers=ADMIN, json={"lora_name": "support"})
    assert unloaded.status_code == 200
    assert "support" not in model_ids(managed)
    gone = http.post(managed.v1 + "/unload_lora_adapter", headers=ADMIN, json={"lora_name": "support"})
    assert gone.status_code == 404


@pytest.mark.parametrize("lora_path,status", [("/etc", 400), ("./no-such-adapter", 404), ("models:/nope", 400)])
def test_a_bad_adapter_fails_its_load_call_and_adds_no_name(managed, lora_path, status):
    response = http.post(managed.v1 + "/load_lora_adapter", headers=ADMIN,
                          json={"lora_name": "broken", "lora_path": lora_path})
    assert response.status_code == status, response.text
    assert "broken" not in model_ids(managed)
    assert chat(managed, "pre").status_code == 200


def test_the_cli_refuses_management_without_an_admin_token(monkeypatch):
    from lorax_mlflow.cli import main

    monkeypatch.delenv("LORAX_ADMIN_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="LORAX_ADMIN_TOKEN"):
        main(["serve", "--enable-adapter-management"])
    with pytest.raises(SystemExit, match="NAME=ID"):
        main(["serve", "--preload-adapter", "no-equals-sign"])

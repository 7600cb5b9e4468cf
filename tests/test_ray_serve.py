"""Ray Serve: two engine replicas of the tiny MLflow model on a local Ray cluster started by this
module (bounded, shut down afterwards), reached through the adapter-affinity ingress with the
unmodified openai SDK. Answers are compared with the single-process server over the same model."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import openai
import pytest

import ray
from ray import serve

from lorax_mlflow.ray import REPLICA_HEADER, build_app, routed_adapter_id, start_local_cluster

pytestmark = pytest.mark.ray
STARTUP_SECONDS = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(model_path):
    start_local_cluster(num_cpus=2)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(str(model_path), replicas=2, num_cpus_per_replica=0.5, max_ongoing_requests=16)
        deploying = threading.Thread(target=serve.run, args=(app,), kwargs={"name": "lorax-test", "route_prefix": "/"},
                                     daemon=True)
        deploying.start()
        deploying.join(STARTUP_SECONDS)
        assert not deploying.is_alive(), f"the Serve application was not ready within {STARTUP_SECONDS}s"
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(api_key="EMPTY", base_url=url + "/v1", max_retries=0, timeout=120)


def ask(url: str, model: str, **extra):
    return client(url).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=8, temperature=0, **extra)


def replica_of(url: str, model: str) -> str:
    response = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert response.status_code == 200, response.text
    return response.headers[REPLICA_HEADER]


def test_the_ingress_routes_on_the_adapter_the_body_names():
    assert routed_adapter_id("/v1/chat/completions", b'{"model": "a", "messages": []}') == "a"
    assert routed_adapter_id("/v1/completions", b'{"model": "base", "adapter_id": "b"}') == "b"
    assert routed_adapter_id("/generate", b'{"inputs": "x", "parameters": {"adapter_id": "c"}}') == "c"
    assert routed_adapter_id("/v1/chat/completions", b'{"model": "a", "merged_adapters": {"ids": ["a"]}}') == ""
    assert routed_adapter_id("/v1/chat/completions", b"not json") == ""


def test_openai_sdk_chat_and_stream_through_the_ingress_match_one_server(ray_url, server, tiny_adapters):
    for model in ("a", "b", str(tiny_adapters["c"])):
        through_ray = ask(ray_url, model)
        direct = ask(server.url, model)
        assert through_ray.choices[0].message.content == direct.choices[0].message.content, model
        assert through_ray.model == model
        chunks = list(ask(ray_url, model, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    models = {m.id for m in client(ray_url).models.list()}
    assert {"a", "b"} <= models
    health = httpx.get(ray_url + "/health", timeout=120)
    assert health.status_code == 200


def test_requests_for_one_adapter_land_on_the_same_replica(ray_url, tiny_adapters):
    for model in ("a", "b", str(tiny_adapters["c"])):
        replicas = {replica_of(ray_url, model) for _ in range(3)}
        assert len(replicas) == 1, (model, replicas)
    generated = httpx.post(ray_url + "/generate", timeout=120,
                           json={"inputs": "Hi", "parameters": {"adapter_id": "a", "max_new_tokens": 2}})
    assert generated.status_code == 200 and generated.headers[REPLICA_HEADER] == replica_of(ray_url, "a")


def test_adapters_are_split_between_the_replicas_each_always_on_its_owner(ray_url):
    def answered_by(model: str) -> str:  # unknown adapters: a quick 4xx, routed like any other
        response = httpx.post(ray_url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert 400 <= response.status_code < 500, response.text
        return response.headers[REPLICA_HEADER]

    owners = {}
    for _ in range(2):
        for i in range(16):
            owners.setdefault(f"org/unknown-{i}", set()).add(answered_by(f"org/unknown-{i}"))
    assert all(len(replicas) == 1 for replicas in owners.values()), owners
    assert len(set().union(*owners.values())) == 2  # not all on one replica (chance 2 ** -15)


def test_errors_keep_their_wire_shape_through_the_ingress(ray_url):
    response = httpx.post(ray_url + "/v1/chat/completions", timeout=120, json={
        "model": "a", "messages": [{"role": "user", "content": "Hi"}], "temperature": -1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"
    generate = httpx.post(ray_url + "/generate", timeout=120, json={"inputs": "Hi", "parameters": {"temperature": -1}})
    assert generate.status_code == 400 and generate.json()["error_type"] == "validation"


def test_a_client_that_disconnects_mid_stream_aborts_its_request_on_the_replica(ray_url):
    body = {"model": "a", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 200,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ray_url + "/v1/chat/completions", json=body, timeout=120) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
    aborted = re.compile(r'^lorax_requests_total\{adapter="a",route="chat",status="499"\} [1-9]', re.M)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # GET /metrics naming adapter "a" is routed to a's replica
        metrics = httpx.request("GET", ray_url + "/metrics", content=b'{"model": "a"}', timeout=120).text
        if aborted.search(metrics):
            return
        time.sleep(0.5)
    raise AssertionError("the replica finished the stream instead of aborting it:\n" +
                         "\n".join(line for line in metrics.splitlines() if line.startswith("lorax_requests_total")))


def test_a_replica_killed_mid_stream_fails_that_stream_and_the_next_request_succeeds(ray_url):
    sdk = client(ray_url)
    with sdk.chat.completions.with_streaming_response.create(
        model="b", messages=[{"role": "user", "content": "Go on"}], max_tokens=200, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    ) as response:
        killed = response.headers[REPLICA_HEADER]
        chunks = iter(response.parse())
        next(chunks)
        ray.kill(ray.get_actor(killed, namespace="serve"), no_restart=True)
        with pytest.raises(openai.APIError, match="replica"):
            for _ in chunks:
                pass
    after = ask(ray_url, "b")
    assert after.choices[0].message.content
    assert replica_of(ray_url, "b") != killed


def test_a_serve_config_builds_the_application_from_its_args():
    from ray.serve import Application

    from lorax_mlflow.ray import app_builder

    assert isinstance(app_builder({"model_uri": "models:/bot@prod", "replicas": 3, "engine_env": {"LORAX_MAX_LORAS": "16"}}),
                      Application)


def test_cli_replicas_starts_the_ray_application(monkeypatch):
    import lorax_mlflow.ray as ray_support
    from lorax_mlflow.cli import main

    calls = []
    monkeypatch.setattr(ray_support, "run_local", lambda model_uri, **kw: calls.append((model_uri, kw)))
    monkeypatch.delenv("LORAX_MAX_LORAS", raising=False)
    assert main(["serve", "-m", "models:/bot@prod", "--replicas", "2", "--max-loras", "3",
                 "--preload-adapter", "support=models:/support@prod"]) == 0
    ((model_uri, options),) = calls
    assert model_uri == "models:/bot@prod" and options["replicas"] == 2
    assert options["engine_env"]["LORAX_MAX_LORAS"] == "3"
    assert options["preload_adapters"] == {"support": "models:/support@prod"}

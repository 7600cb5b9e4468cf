"""Adapters kept in MLflow: logged with `lorax_mlflow.log_adapter` into a throwaway sqlite tracking
store and served by ``models:/name@alias``, ``models:/name/<version>`` and ``runs:/<run_id>/<path>``.
Outputs are compared with the same adapter served from its local folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

import lorax_mlflow
from lorax_mlflow.adapters.sources import AdapterLocation, AdapterSources, parse_adapter_id
from lorax_mlflow.errors import AdapterNotFoundError, AdapterValidationError, InvalidRequestError
from tests.engine_support import PROMPTS, adapter, encode, greedy, make_engine
from tests.helpers import build_peft_adapter, build_tiny_model
from tests.mlflow_support import throwaway_experiment


def tokens(engine, prompt, adapter_id: str) -> list[int]:
    return engine.submit(prompt, greedy(8), adapter(adapter_id)).result().outputs[0].token_ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A throwaway tracking store + registry for the module; yields its experiment id."""
    import mlflow

    with throwaway_experiment(tmp_path_factory.mktemp("mlflow"), "adapters") as experiment_id:
        mlflow.set_experiment(experiment_id=experiment_id)
        yield experiment_id


@pytest.fixture(scope="module")
def mlflow_engine(tiny_model_dir, adapter_root, tmp_path_factory):
    engine = make_engine(tiny_model_dir, [adapter_root], download_dir=str(tmp_path_factory.mktemp("downloads")))
    yield engine
    engine.shutdown()


@pytest.mark.parametrize(
    "uri",
    ["models:/support@prod", "models:/support/3", "runs:/0123abcd/adapter", "runs:/0123abcd/deep/er/adapter"],
)
def test_mlflow_uris_are_recognised_by_shape(uri):
    assert parse_adapter_id(uri) == AdapterLocation("mlflow", uri)
    assert parse_adapter_id(uri, "mlflow") == AdapterLocation("mlflow", uri)


@pytest.mark.parametrize(
    "uri", ["models:/support", "models:/support/latest/x", "models:/@prod", "runs:/abc", "runs:/abc/../other",
            "runs:/abc//etc/passwd", "models:/a/b@c"],
)
def test_malformed_mlflow_uris_are_a_400(uri):
    with pytest.raises(InvalidRequestError):
        parse_adapter_id(uri, "mlflow")


def test_alias_is_resolved_per_request_and_cached_by_version(store, mlflow_engine, tiny_adapters):
    first = lorax_mlflow.log_adapter(tiny_adapters["a"], registered_model_name="support")
    second = lorax_mlflow.log_adapter(tiny_adapters["b"], registered_model_name="support")
    client = MlflowClient()
    client.set_registered_model_alias("support", "prod", first.version)
    prompt = encode(Path(mlflow_engine.model_path), PROMPTS[0])
    local_a = tokens(mlflow_engine, prompt, str(tiny_adapters["a"]))
    local_b = tokens(mlflow_engine, prompt, str(tiny_adapters["b"]))
    assert local_a != local_b

    assert tokens(mlflow_engine, prompt, "models:/support@prod") == local_a
    client.set_registered_model_alias("support", "prod", second.version)
    assert tokens(mlflow_engine, prompt, "models:/support@prod") == local_b  # the next request sees the move
    assert tokens(mlflow_engine, prompt, first.adapter_uri) == local_a
    assert tokens(mlflow_engine, prompt, first.run_uri) == local_a

    known = mlflow_engine.adapters.known_adapter_ids()
    assert {f"models:/support/{first.version}", f"models:/support/{second.version}", first.run_uri} <= set(known)
    stats = mlflow_engine.adapters.adapter_stats()
    assert stats["models:/support@prod"].requests == 2


def test_missing_model_alias_and_run_are_404(store, mlflow_engine):
    prompt = encode(Path(mlflow_engine.model_path), PROMPTS[1])
    lorax_mlflow.log_adapter(build_peft_adapter(Path(mlflow_engine.model_path), Path(mlflow_engine.model_path).parent
                                                / "solo", rank=4, seed=5), registered_model_name="solo")
    for uri in ("models:/nobody@prod", "models:/solo@nothere", "models:/solo/99", "runs:/0123456789abcdef/adapter"):
        with pytest.raises(AdapterNotFoundError):
            tokens(mlflow_engine, prompt, uri)


def test_an_adapter_logged_for_another_base_is_refused_with_a_400(store, mlflow_engine, tmp_path):
    other_base = build_tiny_model(tmp_path / "other-llama", seed=7)  # same shapes, other weights
    other_adapter = build_peft_adapter(other_base, tmp_path / "for-other", rank=4, seed=3)
    info = lorax_mlflow.log_adapter(other_adapter, registered_model_name="other")
    assert info.base_model.endswith("other-llama")
    prompt = encode(Path(mlflow_engine.model_path), PROMPTS[2])
    with pytest.raises(AdapterValidationError, match="other-llama") as caught:
        tokens(mlflow_engine, prompt, info.adapter_uri)
    assert caught.value.status == 400 and caught.value.code == "adapter_base_mismatch"
    assert tokens(mlflow_engine, prompt, "") is not None  # the engine serves on


def test_adapters_over_the_byte_limit_are_refused_before_download(store, tiny_adapters, tmp_path):
    info = lorax_mlflow.log_adapter(tiny_adapters["a"])
    sources = AdapterSources([], tmp_path, max_adapter_bytes=1000)
    with pytest.raises(AdapterValidationError, match="larger than the limit"):
        sources.fetch(parse_adapter_id(info.run_uri))
    assert not any((tmp_path / "mlflow").glob("*/adapter_model.safetensors"))
    folder = AdapterSources([], tmp_path).fetch(parse_adapter_id(info.run_uri))
    assert (folder / "adapter_model.safetensors").is_file() and folder.is_relative_to(tmp_path.resolve())


def test_mlflow_adapters_over_http_with_adapter_source(store, server, tiny_adapters, tmp_path):
    import httpx

    info = lorax_mlflow.log_adapter(tiny_adapters["b"], registered_model_name="http-adapter")
    MlflowClient().set_registered_model_alias("http-adapter", "prod", info.version)

    def chat(model: str, **extra) -> httpx.Response:
        return httpx.post(server.v1 + "/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
            **extra})

    by_alias = chat("models:/http-adapter@prod", adapter_source="mlflow")
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json()["choices"][0]["message"] == chat(str(tiny_adapters["b"])).json()["choices"][0]["message"]

    other_base = build_tiny_model(tmp_path / "other-base", seed=9)
    wrong = lorax_mlflow.log_adapter(build_peft_adapter(other_base, tmp_path / "wrong", rank=4, seed=2))
    refused = chat(wrong.run_uri)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "adapter_base_mismatch"
    assert chat("models:/http-adapter@missing").status_code == 404

"""MLflow traces of LoraxChatModel requests: span tree, attributes, timing order, and nothing when off."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.entities import SpanStatusCode, TraceState
from mlflow.exceptions import MlflowException

import lorax_mlflow
from lorax_mlflow import tracing
from tests.mlflow_support import TINY_ENGINE, throwaway_experiment

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PHASES = ["template", "queue", "prefill", "decode"]


@pytest.fixture(scope="module")
def experiment_id(tmp_path_factory):
    """Traces land in a throwaway sqlite tracking store."""
    with throwaway_experiment(tmp_path_factory.mktemp("traces"), "tracing") as experiment:
        yield experiment


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_model_dir, tiny_adapters):
    path = tmp_path_factory.mktemp("traced") / "model"
    lorax_mlflow.save_model(path, base_model=str(tiny_model_dir), adapters={"support": tiny_adapters["a"]},
                            engine_config=TINY_ENGINE)
    return mlflow.pyfunc.load_model(str(path))


@pytest.fixture
def traced(experiment_id):
    tracing.autolog()
    try:
        with mlflow.start_run(experiment_id=experiment_id):
            yield experiment_id
    finally:
        tracing.autolog(disable=True)


def chat(content: str, adapter_id: str = "support", max_tokens: int = 6) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "custom_inputs": {"adapter_id": adapter_id, "ignore_eos": True}}


def last_trace():
    mlflow.flush_trace_async_logging()
    return mlflow.get_trace(mlflow.get_last_active_trace_id())


def trace_count(experiment_id: str) -> int:
    mlflow.flush_trace_async_logging()
    return len(mlflow.search_traces(locations=[experiment_id], return_type="list"))


def root_and_children(trace):
    (root,) = [span for span in trace.data.spans if span.name == tracing.ROOT_SPAN]
    children = sorted((s for s in trace.data.spans if s.parent_id == root.span_id), key=lambda s: s.start_time_ns)
    return root, children


def assert_phases_in_time_order(root, children):
    assert [span.name for span in children] == PHASES
    edges = [root.start_time_ns]
    for span in children:
        edges += [span.start_time_ns, span.end_time_ns]
    edges.append(root.end_time_ns)
    assert edges == sorted(edges), "template, queue, prefill and decode follow each other inside the request"


def test_predict_is_one_trace_with_template_queue_prefill_and_decode_spans(model, traced):
    response = model.predict(chat("Tell me a story"))
    trace = last_trace()
    root, children = root_and_children(trace)

    assert root.parent_id is None and root.span_type == "CHAT_MODEL"
    assert_phases_in_time_order(root, children)
    usage = response["usage"]
    assert root.attributes["adapter_id"] == "support"
    assert root.attributes["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert root.attributes["completion_tokens"] == usage["completion_tokens"] == 6
    assert root.attributes["finish_reasons"] == ["length"]
    assert root.attributes["mlflow.chat.tokenUsage"] == {
        "input_tokens": usage["prompt_tokens"], "output_tokens": 6, "total_tokens": usage["total_tokens"]}
    assert root.inputs["messages"] == [{"role": "user", "content": "Tell me a story"}]
    assert root.outputs["choices"][0]["message"] == response["choices"][0]["message"]
    assert root.outputs["id"] == response["id"]
    phases = {span.name: span for span in children}
    assert phases["prefill"].attributes["prompt_tokens"] == usage["prompt_tokens"]
    assert phases["decode"].attributes["completion_tokens"] == 6
    assert trace.info.state == TraceState.OK


def test_secrets_never_reach_a_trace(model, traced):
    """`api_token` from custom_inputs used to land in the trace inputs in plain text."""
    request = chat("hi")
    request["custom_inputs"]["api_token"] = "hf_secretsecretsecret"
    model.predict(request)
    trace = last_trace()
    assert "hf_secretsecretsecret" not in trace.to_json()
    root, _ = root_and_children(trace)
    assert root.inputs["api_token"] == "[REDACTED]"


def test_predict_stream_is_traced_with_the_streamed_reply_as_outputs(model, traced):
    chunks = list(model.predict_stream(chat("Count to five", max_tokens=8)))
    streamed = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    root, children = root_and_children(last_trace())

    assert root.attributes["method"] == "predict_stream"
    assert_phases_in_time_order(root, children)
    assert root.outputs["choices"][0]["message"]["content"] == streamed
    assert root.attributes["completion_tokens"] == 8 and root.attributes["finish_reasons"] == ["length"]


def test_a_request_inside_a_callers_span_joins_the_callers_trace(model, traced):
    with mlflow.start_span("support-ticket") as caller:
        model.predict(chat("hi"))
    trace = last_trace()
    root, children = root_and_children(trace)
    assert trace.info.trace_id == caller.trace_id
    assert root.parent_id == caller.span_id
    assert [span.name for span in children] == PHASES


def test_a_failed_request_is_an_error_trace_that_stops_at_the_template(model, traced):
    with pytest.raises(MlflowException, match="not"):
        model.predict(chat("hi", adapter_id="nope/unknown-adapter-xyz"))
    trace = last_trace()
    root, children = root_and_children(trace)
    assert trace.info.state == TraceState.ERROR
    assert [span.name for span in children] == ["template"]
    assert children[0].status.status_code == SpanStatusCode.ERROR


def test_nothing_is_traced_unless_switched_on_nor_after_mlflow_disables_tracing(model, experiment_id):
    with mlflow.start_run(experiment_id=experiment_id):
        before = trace_count(experiment_id)
        assert type(tracing.start_request("predict", {})) is tracing.RequestTrace
        model.predict(chat("hi"))
        assert trace_count(experiment_id) == before

        tracing.autolog()
        mlflow.tracing.disable()
        try:
            assert not tracing.enabled()
            model.predict(chat("hi"))
        finally:
            mlflow.tracing.enable()
            tracing.autolog(disable=True)
        assert trace_count(experiment_id) == before


def test_the_environment_variable_switches_tracing_on(monkeypatch):
    assert not tracing.enabled()
    monkeypatch.setenv(tracing.ENV_VAR, "1")
    assert tracing.enabled()


def test_requests_to_the_http_server_are_traced_like_predict_and_never_record_a_token(model, traced):
    import json

    import httpx

    from lorax_mlflow.chat_model import unwrap_chat_model
    from lorax_mlflow.server import ServedModel
    from tests.server_support import running_server

    with running_server(ServedModel(unwrap_chat_model(model).service, model.predict)) as server:
        response = httpx.post(server.v1 + "/chat/completions", timeout=120, json={
            "model": "support", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "api_token": "secret-token-123"},
            headers={"Authorization": "Bearer header-secret-456"}).json()
    trace = last_trace()
    root, children = root_and_children(trace)
    assert root.attributes["method"] == "chat.completions"
    assert_phases_in_time_order(root, children)
    assert root.outputs["id"] == response["id"]
    assert root.attributes["completion_tokens"] == 5
    assert "secret-token-123" not in trace.to_json() and "header-secret-456" not in trace.to_json()
    assert trace.info.state == TraceState.OK

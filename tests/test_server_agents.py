"""Agents against `lorax-mlflow serve`: the real openai SDK and LangChain calling tools (sync and
streamed, with a tool-result round trip), MLflow predict() and /invocations doing the same, guided
decoding over HTTP, and the fields real clients send.

The model is the tiny random Llama with 2048 positions (tool listings make long prompts) and
adapter "a"; forced calls make its output a valid call whatever its weights prefer.
"""

from __future__ import annotations

import json
import logging
import re

import httpx
import jsonschema
import openai
import pytest

import lorax_mlflow
from tests.helpers import build_tiny_model
from tests.mlflow_support import TINY_ENGINE
from tests.server_support import load_tiny_model, running_server

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                       "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                      "required": ["city", "days"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                            "parameters": WEATHER_PARAMETERS}}
QUESTION = [{"role": "user", "content": "What will the weather be in Paris tomorrow?"}]


@pytest.fixture(scope="module")
def agent_model(tmp_path_factory, tiny_adapters, adapter_root):
    folder = tmp_path_factory.mktemp("agents")
    base = build_tiny_model(folder / "base", max_position_embeddings=2048)
    path = folder / "model"
    lorax_mlflow.save_model(path, base_model=str(base), adapters={"a": tiny_adapters["a"]},
                            adapter_roots=[adapter_root],
                            engine_config={**TINY_ENGINE, "max_model_len": 2048, "kv_cache_bytes": 32 << 20})
    served = load_tiny_model(path)
    yield served
    served.service.engine.shutdown()


@pytest.fixture(scope="module")
def agent_server(agent_model):
    with running_server(agent_model) as running:
        yield running


@pytest.fixture(scope="module")
def client(agent_server):
    return openai.OpenAI(api_key="EMPTY", base_url=agent_server.v1, max_retries=0)


def assert_valid_weather_call(name: str, arguments: str | dict) -> dict:
    assert name == "get_weather"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, WEATHER_PARAMETERS)
    return args


# ----- openai SDK ----------------------------------------------------------------------------------


def test_openai_sdk_forced_call_then_tool_result_round_trip(client):
    first = client.chat.completions.create(model="a", messages=QUESTION, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=120)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert_valid_weather_call(call.function.name, call.function.arguments)

    history = [*QUESTION, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"}]
    second = client.chat.completions.create(model="a", messages=history, tools=[WEATHER], temperature=0,
                                            max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_openai_sdk_stream_helper_accumulates_the_streamed_call(client):
    request = dict(model="a", messages=QUESTION, tools=[WEATHER], tool_choice="required", temperature=0,
                   max_tokens=300)  # parallel calls allowed: the random model makes the most it may (4)
    whole = client.chat.completions.create(**request)
    with client.chat.completions.stream(**request) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and len(calls) > 1
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert len({c.id for c in calls}) == len(calls)


def test_named_tool_choice_and_parallel_calls(client):
    time_tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
    named = client.chat.completions.create(model="", messages=QUESTION, tools=[WEATHER, time_tool],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           temperature=0, max_tokens=60)
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_time"]
    single = client.chat.completions.create(model="", messages=QUESTION, tools=[WEATHER, time_tool],
                                            tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                                            seed=5, max_tokens=200)
    assert len(single.choices[0].message.tool_calls) == 1


def test_tool_choice_none_and_auto_answer_in_plain_text_when_the_model_does_not_call(client):
    for choice in ("none", "auto"):
        response = client.chat.completions.create(model="a", messages=QUESTION, tools=[WEATHER], tool_choice=choice,
                                                  temperature=0, max_tokens=6, extra_body={"ignore_eos": True})
        assert response.choices[0].message.tool_calls is None
        assert response.choices[0].finish_reason == "length"


# ----- LangChain -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_openai(agent_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="a", base_url=agent_server.v1, api_key="EMPTY", temperature=0, max_tokens=120,
                      max_retries=0)


def test_langchain_bind_tools_then_round_trip_with_a_tool_message(chat_openai):
    from langchain_core.messages import HumanMessage, ToolMessage

    llm = chat_openai.bind_tools([WEATHER], tool_choice="required", parallel_tool_calls=False)
    question = HumanMessage(QUESTION[0]["content"])
    ai = llm.invoke([question])
    (call,) = ai.tool_calls
    assert_valid_weather_call(call["name"], call["args"])
    answer = chat_openai.bind_tools([WEATHER]).invoke(
        [question, ai, ToolMessage("sunny, 24C", tool_call_id=call["id"])], max_tokens=8)
    assert answer.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")


def test_langchain_streamed_tool_call_chunks_merge_into_the_same_call(chat_openai):
    llm = chat_openai.bind_tools([WEATHER], tool_choice="required", parallel_tool_calls=False)
    whole = llm.invoke(QUESTION[0]["content"])
    merged = None
    for chunk in llm.stream(QUESTION[0]["content"]):
        merged = chunk if merged is None else merged + chunk
    (call,) = merged.tool_calls
    assert (call["name"], call["args"]) == (whole.tool_calls[0]["name"], whole.tool_calls[0]["args"])
    assert merged.response_metadata["finish_reason"] == "tool_calls"


# ----- MLflow predict and /invocations -------------------------------------------------------------


MLFLOW_TOOL = {"type": "function", "function": {"name": "pick_city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
"""A tool within what MLflow's own tool type (ChatParams.tools) can describe."""


def test_predict_takes_tools_from_chat_params_and_tool_choice_from_custom_inputs(agent_model):
    response = agent_model.predict({"messages": QUESTION, "tools": [MLFLOW_TOOL], "temperature": 0.0,
                                    "max_tokens": 120, "custom_inputs": {"tool_choice": "required", "adapter_id": "a",
                                                                         "parallel_tool_calls": False}})
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "pick_city"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")


def test_predict_takes_full_json_schema_tools_from_custom_inputs(agent_model):
    """MLflow's schema enforcement rejects `maxLength` and friends in ChatParams.tools: custom_inputs carries them."""
    response = agent_model.predict({"messages": QUESTION, "temperature": 0.0, "max_tokens": 120, "custom_inputs": {
        "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}})
    (call,) = response["choices"][0]["message"]["tool_calls"]
    assert_valid_weather_call(call["function"]["name"], call["function"]["arguments"])


def test_predict_stream_yields_the_call_and_finish_reason(agent_model):
    from mlflow.types.llm import ChatMessage, ChatParams

    from lorax_mlflow.chat_model import unwrap_chat_model

    chat_model = unwrap_chat_model(agent_model.predict.__self__)  # the loaded pyfunc model behind the server
    params = ChatParams(temperature=0.0, max_tokens=120,
                        custom_inputs={"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False})
    chunks = list(chat_model.predict_stream(None, [ChatMessage(**QUESTION[0])], params))
    calls = [c for chunk in chunks for choice in chunk.choices for c in (choice.delta.tool_calls or [])]
    assert len(calls) == 1
    assert_valid_weather_call(calls[0].function.name, calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_invocations_openai_body_model_selects_the_adapter_and_fields_reach_the_model(agent_server, agent_model):
    body = {"messages": QUESTION, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    by_model = httpx.post(agent_server.url + "/invocations", json={**body, "model": "a"}, timeout=60).json()
    by_custom = httpx.post(agent_server.url + "/invocations",
                           json={**body, "custom_inputs": {"adapter_id": "a"}}, timeout=60).json()
    base = httpx.post(agent_server.url + "/invocations", json=body, timeout=60).json()
    assert by_model["model"] == "a" and by_model["choices"][0]["message"]["content"] == \
        by_custom["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    # custom_inputs wins when both name an adapter
    both = httpx.post(agent_server.url + "/invocations",
                      json={**body, "model": "a", "custom_inputs": {"adapter_id": ""}}, timeout=60).json()
    assert both["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
    forced = httpx.post(agent_server.url + "/invocations", timeout=60, json={
        "messages": QUESTION, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
        "max_tokens": 120, "temperature": 0})
    assert forced.json()["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("body, status, code", [
    ({"messages": QUESTION, "model": "{root}/no-such-adapter"}, 404, "RESOURCE_DOES_NOT_EXIST"),
    ({"messages": QUESTION, "temperature": 7.0}, 400, "INVALID_PARAMETER_VALUE"),
    ({"messages": QUESTION, "tool_choice": "required"}, 400, "INVALID_PARAMETER_VALUE"),
])
def test_invocations_errors_are_mlflow_errors_with_the_right_status(agent_server, adapter_root, body, status, code):
    if "model" in body:
        body = {**body, "model": body["model"].format(root=adapter_root)}
    response = httpx.post(agent_server.url + "/invocations", json=body, timeout=60)
    assert response.status_code == status and response.json()["error_code"] == code


# ----- guided decoding over HTTP --------------------------------------------------------------------


def test_guided_choice_on_chat_and_guided_regex_on_completions_and_generate(client, agent_server):
    choices = ["yes", "no", "maybe"]
    chat = client.chat.completions.create(model="a", messages=QUESTION, temperature=1.0, seed=1, max_tokens=10,
                                          extra_body={"guided_choice": choices})
    assert chat.choices[0].message.content in choices
    pattern = r"[A-Z]{3}-[0-9]{2}"
    completion = client.completions.create(model="a", prompt="Code:", temperature=1.0, seed=2, max_tokens=16,
                                           extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, completion.choices[0].text)
    generated = httpx.post(agent_server.url + "/generate", timeout=60, json={
        "inputs": "Code:", "parameters": {"max_new_tokens": 16, "guided_regex": pattern, "adapter_id": "a"}})
    assert re.fullmatch(pattern, generated.json()["generated_text"])


# ----- fields real clients send ---------------------------------------------------------------------


def test_fields_that_change_nothing_are_accepted_and_a_string_is_one_user_message(client, agent_server):
    response = client.chat.completions.create(
        model="a", messages=QUESTION, max_tokens=4, temperature=0, store=True, metadata={"k": "v"},
        service_tier="auto", user="u1", reasoning_effort="low", modalities=["text"],
        extra_body={"prompt_cache_key": "p", "safety_identifier": "s", "ignore_eos": True})
    as_string = httpx.post(agent_server.v1 + "/chat/completions", timeout=60, json={
        "model": "a", "messages": QUESTION[0]["content"], "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert as_string.json()["choices"][0]["message"]["content"] == response.choices[0].message.content


@pytest.mark.parametrize("extra, param, message", [
    ({"modalities": ["text", "audio"]}, "modalities.1", "invalid value"),
    ({"frobnicate": 1}, "frobnicate", "unsupported parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
     "messages", "this model accepts text only"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it_and_logged_on_one_info_line(agent_server, caplog, extra, param,
                                                                                 message):
    body = {"model": "a", "messages": QUESTION, "max_tokens": 4, **extra}
    with caplog.at_level(logging.INFO, logger="lorax_mlflow.server.errors"):
        response = httpx.post(agent_server.v1 + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "lorax_mlflow.server.errors"]
    assert line.startswith("POST /v1/chat/completions -> 400 param=" + param)
    assert QUESTION[0]["content"] not in line


# ----- MLflow AI Gateway in front ---------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_ai_gateway_fronts_chat_completions_and_tools_one_endpoint_per_adapter(agent_server, agent_model,
                                                                                      client, tmp_path):
    import yaml
    from mlflow.deployments import get_deploy_client

    from examples.gateway_demo import free_port, start_gateway, stop

    upstream = {"openai_api_key": "unused", "openai_api_base": agent_server.v1}
    base = agent_model.service.base_model_name

    def endpoint(name: str, kind: str, model: str) -> dict:
        return {"name": name, "endpoint_type": f"llm/v1/{kind}",
                "model": {"provider": "openai", "name": model, "config": upstream}}

    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"endpoints": [
        endpoint("chat-a", "chat", "a"), endpoint("chat-base", "chat", base), endpoint("completions-a", "completions", "a"),
    ]}))
    port = free_port()
    gateway = start_gateway(config, port)
    try:
        url = f"http://127.0.0.1:{port}"
        deployments = get_deploy_client(url)
        request = {"messages": QUESTION, "max_tokens": 6, "temperature": 0}
        for name, model in (("chat-a", "a"), ("chat-base", "")):
            through = deployments.predict(endpoint=name, inputs=request)
            direct = client.chat.completions.create(model=model, **request)
            assert through["choices"][0]["message"]["content"] == direct.choices[0].message.content
        completion = deployments.predict(endpoint="completions-a",
                                         inputs={"prompt": "Once upon", "max_tokens": 6, "temperature": 0})
        direct = client.completions.create(model="a", prompt="Once upon", max_tokens=6, temperature=0)
        assert completion["choices"][0]["text"] == direct.choices[0].text

        gateway_openai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        # the gateway's tool type keeps what MLflow's does (type, description, enum, items): no maxLength
        forced = gateway_openai.chat.completions.create(model="chat-a", messages=QUESTION, tools=[MLFLOW_TOOL],
                                                        tool_choice="required", temperature=0, max_tokens=300)
        assert forced.choices[0].finish_reason == "tool_calls"
        for call in forced.choices[0].message.tool_calls:
            assert call.function.name == "pick_city"
            assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    finally:
        stop(gateway)

"""The OpenAI-compatible routes, driven by the real `openai` SDK against a server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import mlflow
import openai
import pytest

from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.api.chat_request import chat_request
from lorax_mlflow.api.schemas import ChatCompletionRequest, parse_request
from lorax_mlflow.chat_model import unwrap_chat_model
from lorax_mlflow.engine.sampling_params import SamplingParams
from tests.server_support import running_server, wait_healthy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HELLO = [{"role": "user", "content": "Tell me about the sea"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="EMPTY", base_url=server.v1, max_retries=0)


def engine_run(served, body: dict, model: str = ""):
    """Reference: the same request prepared by the shared service and run on the engine directly."""
    service = served.service
    request = parse_request(ChatCompletionRequest, {**body, "model": model})
    return service.submit(chat_request(service, request, model=model)).result()


def engine_completion(served, prompt_ids: list[int], max_tokens: int, model: str = ""):
    service = served.service
    adapter = service.engine.adapters.resolve(AdapterRequest(model))
    return service.engine.submit(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter).result()


# ----- chat ----------------------------------------------------------------------------------------


def test_greedy_chat_through_http_equals_the_engine_output_for_the_same_request(client, served):
    response = client.chat.completions.create(model="a", messages=HELLO, max_tokens=10, temperature=0)
    reference = engine_run(served, {"messages": HELLO, "max_tokens": 10, "temperature": 0}, model="a")
    assert response.choices[0].message.content == reference.outputs[0].text
    assert response.choices[0].message.role == "assistant"
    assert response.model == "a" and response.object == "chat.completion"


def test_usage_counts_equal_the_tokenizer_counts(client, served):
    response = client.chat.completions.create(model="b", messages=HELLO, max_tokens=7, temperature=0,
                                              extra_body={"ignore_eos": True})
    tokenizer = served.service.engine.tokenizer
    rendered = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 7
    assert response.usage.total_tokens == len(prompt_ids) + 7
    assert response.choices[0].finish_reason == "length"


def test_a_resent_conversation_reports_its_cached_prompt_tokens_in_usage(client):
    messages = [{"role": "user", "content": "A conversation that only this test sends, with some history. " * 4}]
    first = client.chat.completions.create(model="a", messages=messages, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model="a", messages=messages, max_tokens=3, temperature=0)
    other_adapter = client.chat.completions.create(model="b", messages=messages, max_tokens=3, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (again.usage.prompt_tokens - 1) // 16 * 16  # every full block but the last token's
    # At most the chat template's default system prompt was cached before; "b" never reuses "a"'s K/V.
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    assert other_adapter.usage.prompt_tokens_details.cached_tokens < cached

    prompts = ["A completion prompt that only this test sends, long enough for a block or two. " * 2, "Hi"]
    client.completions.create(model="a", prompt=prompts[0], max_tokens=2, temperature=0)
    both = client.completions.create(model="a", prompt=prompts, max_tokens=2, temperature=0)
    assert both.usage.prompt_tokens_details.cached_tokens >= 16


def test_base_model_is_selected_by_an_empty_model_or_its_name_and_differs_from_an_adapter(client, served):
    by_empty = client.chat.completions.create(model="", messages=HELLO, max_tokens=8, temperature=0)
    by_name = client.chat.completions.create(model=served.service.base_model_name, messages=HELLO, max_tokens=8,
                                             temperature=0)
    with_adapter = client.chat.completions.create(model="a", messages=HELLO, max_tokens=8, temperature=0)
    assert by_empty.choices[0].message.content == by_name.choices[0].message.content
    assert by_empty.choices[0].message.content != with_adapter.choices[0].message.content
    assert by_empty.model == served.service.base_model_name


def test_an_adapter_under_the_adapter_roots_can_be_named_by_path(client, tiny_adapters, served):
    response = client.chat.completions.create(model=str(tiny_adapters["c"]), messages=HELLO, max_tokens=6,
                                              temperature=0)
    reference = engine_run(served, {"messages": HELLO, "max_tokens": 6, "temperature": 0},
                           model=str(tiny_adapters["c"]))
    assert response.choices[0].message.content == reference.outputs[0].text


def test_max_tokens_ends_with_finish_reason_length(client):
    response = client.chat.completions.create(model="a", messages=HELLO, max_completion_tokens=3, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_stop_string_cuts_the_text_before_it(client):
    full = client.chat.completions.create(model="a", messages=HELLO, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.chat.completions.create(model="a", messages=HELLO, max_tokens=12, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_n_2_returns_two_indexed_choices_and_counts_both_in_usage(client):
    response = client.chat.completions.create(model="a", messages=HELLO, max_tokens=5, n=2, temperature=1.0,
                                              seed=7, extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 10
    again = client.chat.completions.create(model="a", messages=HELLO, max_tokens=5, n=2, temperature=1.0, seed=7,
                                           extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in response.choices]


def test_logprobs_with_top_logprobs(client):
    response = client.chat.completions.create(model="", messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
                                              top_logprobs=2, extra_body={"ignore_eos": True})
    entries = response.choices[0].logprobs.content
    assert len(entries) == 4
    for entry in entries:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy takes the top


# ----- streaming -----------------------------------------------------------------------------------


def test_streamed_chat_adds_up_to_the_whole_answer_and_ends_with_usage(client):
    whole = client.chat.completions.create(model="a", messages=HELLO, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="a", messages=HELLO, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices == []
    # The same prompt again: equal counts, and its history now comes from the prefix cache.
    assert chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == whole.usage.model_dump(
        exclude={"prompt_tokens_details"})
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_stream_ends_with_done_on_the_wire(server):
    body = {"model": "", "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert "usage" not in json.loads(events[-2][len("data: "):])  # usage only when asked for


def test_async_stream_with_n_2_interleaves_choices_by_index(server):
    async def run():
        client = openai.AsyncOpenAI(api_key="EMPTY", base_url=server.v1, max_retries=0)
        whole = await client.chat.completions.create(model="b", messages=HELLO, max_tokens=6, n=2, temperature=0.9,
                                                     seed=3, extra_body={"ignore_eos": True})
        stream = await client.chat.completions.create(model="b", messages=HELLO, max_tokens=6, n=2,
                                                      temperature=0.9, seed=3, stream=True,
                                                      extra_body={"ignore_eos": True})
        texts, finish = {0: "", 1: ""}, {}
        async for chunk in stream:
            indices = [c.index for c in chunk.choices]
            assert indices == sorted(indices)
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
        await client.close()
        return whole, texts, finish

    whole, texts, finish = asyncio.run(run())
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {0: "length", 1: "length"}


def test_a_client_that_leaves_mid_stream_aborts_its_request_and_frees_its_kv_blocks(server, served):
    engine = served.service.engine
    total = engine.stats().kv_blocks_total
    body = {"model": "a", "messages": HELLO, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(3)]
        assert engine.stats().kv_blocks_free < total  # the request holds blocks while streaming
    assert received[0].startswith("data: ")
    deadline = time.monotonic() + 20
    while engine.stats().kv_blocks_free != total and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().kv_blocks_free == total
    assert engine.stats().num_running == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'lorax_requests_total{adapter="a",route="chat",status="499"} 1.0' in metrics


# ----- completions ---------------------------------------------------------------------------------


def test_completions_accept_every_prompt_form_and_match_the_engine(client, served):
    tokenizer = served.service.engine.tokenizer
    prompts = ["The sea is", "Once upon a time"]
    ids = [tokenizer.encode(p) for p in prompts]
    expected = [engine_completion(served, p, 6, model="a").outputs[0].text for p in ids]
    single = client.completions.create(model="a", prompt=prompts[0], max_tokens=6, temperature=0)
    as_strings = client.completions.create(model="a", prompt=prompts, max_tokens=6, temperature=0)
    as_ids = client.completions.create(model="a", prompt=ids[1], max_tokens=6, temperature=0)
    as_id_lists = client.completions.create(model="a", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in single.choices] == expected[:1]
    assert [c.text for c in as_strings.choices] == expected
    assert [c.text for c in as_ids.choices] == expected[1:]
    assert [c.text for c in as_id_lists.choices] == expected
    assert [c.index for c in as_id_lists.choices] == [0, 1]
    assert as_id_lists.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    assert as_strings.object == "text_completion"


def test_completions_echo_and_suffix(client):
    plain = client.completions.create(model="", prompt="The sea is", max_tokens=4, temperature=0)
    echoed = client.completions.create(model="", prompt="The sea is", max_tokens=4, temperature=0, echo=True,
                                       suffix=" [end]")
    assert echoed.choices[0].text == "The sea is" + plain.choices[0].text + " [end]"


def test_completions_with_two_prompts_and_n_2_index_choices_per_prompt(client):
    response = client.completions.create(model="b", prompt=["a", "b"], max_tokens=3, n=2, temperature=1.0, seed=5)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]


def test_streamed_completions_add_up_per_choice_and_end_with_usage(client):
    whole = client.completions.create(model="b", prompt=["The sea is", "Hi"], max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model="b", prompt=["The sea is", "Hi"], max_tokens=5, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        usage = chunk.usage or usage
    assert texts == {c.index: c.text for c in whole.choices}
    assert usage.model_dump(exclude={"prompt_tokens_details"}) == whole.usage.model_dump(exclude={"prompt_tokens_details"})


# ----- models, errors, health ----------------------------------------------------------------------


def test_models_list_has_the_base_model_and_the_packaged_adapters(client, served):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == served.service.base_model_name
    assert {"a", "b"} <= set(ids)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "not a name"}}]}, "tools"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"stop": 3}, None),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_invalid_parameters_answer_400_in_the_openai_error_shape(server, extra, param):
    body = {"model": "", "messages": HELLO, "max_tokens": 4, **extra}
    response = httpx.post(server.v1 + "/chat/completions", json=body, headers={"Authorization": "Bearer EMPTY"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_the_sdk_raises_bad_request_for_an_invalid_parameter(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=HELLO, temperature=-1)
    assert caught.value.body["param"] == "temperature"


def test_malformed_json_answers_400_not_fastapis_422(server):
    for route in ("/chat/completions", "/completions"):
        response = httpx.post(server.v1 + route, content=b'{"messages": [', headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_json"
    missing = httpx.post(server.v1 + "/chat/completions", json={"model": ""})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"


def test_unknown_adapter_answers_404(client, adapter_root):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=str(adapter_root / "no-such-adapter"), messages=HELLO, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=str(adapter_root / "no-such-adapter"), prompt="hi", max_tokens=2)


def test_unknown_route_answers_404_in_the_openai_shape(server):
    response = httpx.get(server.v1 + "/engines")
    assert response.status_code == 404 and "error" in response.json()


def test_routes_answer_503_while_the_model_loads_and_serve_once_it_is_ready(served):
    gate = threading.Event()

    def slow_loader():
        gate.wait(30)
        return served

    with running_server(slow_loader) as loading:
        assert httpx.get(loading.url + "/health").status_code == 503
        client = openai.OpenAI(api_key="EMPTY", base_url=loading.v1, max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="", messages=HELLO, max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.body["type"] == "service_unavailable"
        gate.set()
        wait_healthy(loading.url)
        assert client.chat.completions.create(model="", messages=HELLO, max_tokens=2).choices


# ----- MLflow /invocations, metrics, OpenAPI -------------------------------------------------------


def test_invocations_answers_what_mlflow_pyfunc_predict_answers(server, model_path):
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "custom_inputs": {"adapter_id": "b"}}
    over_http = httpx.post(server.url + "/invocations", json=body)
    assert over_http.status_code == 200
    reference = mlflow.pyfunc.load_model(str(model_path))
    try:
        expected = reference.predict(body)
    finally:
        unwrap_chat_model(reference).service.engine.shutdown()
    answer = over_http.json()
    assert answer["choices"][0]["message"] == expected["choices"][0]["message"]
    assert answer["usage"] == expected["usage"] and answer["model"] == expected["model"] == "b"
    assert set(answer) == set(expected)


def test_invocations_errors_use_mlflows_shape(server, adapter_root):
    body = {"messages": HELLO, "custom_inputs": {"adapter_id": str(adapter_root / "missing")}}
    response = httpx.post(server.url + "/invocations", json=body)
    assert response.status_code == 404
    assert response.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_metrics_report_requests_tokens_and_engine_state_by_adapter(client, server):
    client.chat.completions.create(model="b", messages=HELLO, max_tokens=3, temperature=0,
                                   extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    assert 'lorax_requests_total{adapter="b",route="chat",status="200"}' in text
    assert 'lorax_generation_tokens_total{adapter="b"}' in text
    assert 'lorax_request_queue_seconds_count{adapter="b"}' in text
    assert 'lorax_prefix_cache_queries_total{adapter="b"}' in text
    assert 'lorax_prefix_cache_hits_total{adapter="b"}' in text
    for gauge in ("lorax_batch_size", "lorax_kv_blocks_used", "lorax_kv_blocks_total", "lorax_adapters_loaded"):
        assert f"\n{gauge} " in text


def metric_value(text: str, sample: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(sample + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_prefix_cache_counters_count_queried_and_hit_prompt_tokens_per_adapter(client, server):
    messages = [{"role": "user", "content": "Counting cached tokens, a message only this test sends. " * 3}]
    queries, hits = 'lorax_prefix_cache_queries_total{adapter="a"}', 'lorax_prefix_cache_hits_total{adapter="a"}'
    before = httpx.get(server.url + "/metrics").text
    responses = [client.chat.completions.create(model="a", messages=messages, max_tokens=2, temperature=0)
                 for _ in range(2)]
    after = httpx.get(server.url + "/metrics").text
    assert metric_value(after, queries) - metric_value(before, queries) == sum(r.usage.prompt_tokens for r in responses)
    assert metric_value(after, hits) - metric_value(before, hits) == sum(
        r.usage.prompt_tokens_details.cached_tokens for r in responses) > 0


def test_openapi_schema_lists_every_route(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/generate", "/generate_stream",
                 "/invocations", "/health", "/metrics"):
        assert path in paths


# ----- the CLI -------------------------------------------------------------------------------------


def test_cli_serves_a_model_uri_and_its_engine_flags_win_over_the_environment(model_path, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "LORAX_MAX_MODEL_LEN": "64", "LORAX_MAX_LORAS": "2"}
    command = [sys.executable, "-m", "lorax_mlflow.cli", "serve", "-m", str(model_path), "--port", str(port),
               "--max-model-len", "128", "--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # two interpreters load torch: slow on a busy machine
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read().decode()
        client = openai.OpenAI(api_key="EMPTY", base_url=url + "/v1", max_retries=0)
        assert client.chat.completions.create(model="a", messages=HELLO, max_tokens=3).choices
        with pytest.raises(openai.BadRequestError) as caught:  # the flag (128), not the env (64) or the model (256)
            client.completions.create(model="", prompt="hi", max_tokens=200)
        assert "maximum context length is 128" in caught.value.body["message"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_cli_help_lists_serve_and_the_engine_flags():
    result = subprocess.run([sys.executable, "-m", "lorax_mlflow.cli", "serve", "--help"], capture_output=True,
                            text=True, check=True)
    for flag in ("--model-uri", "--kv-cache-bytes", "--max-loras", "--max-lora-rank", "--adapter-root", "--dtype",
                 "--device", "--max-num-batched-tokens", "--max-model-len", "--no-prefix-caching", "LORAX_MAX_LORAS"):
        assert flag in result.stdout


def test_no_prefix_caching_flag_turns_the_engine_config_field_off(monkeypatch):
    from lorax_mlflow.cli import build_parser, engine_flag_values
    from lorax_mlflow.engine.config import EngineConfig

    assert EngineConfig().enable_prefix_caching is True  # on by default
    assert "enable_prefix_caching" not in engine_flag_values(build_parser().parse_args(["serve"]))
    overrides = engine_flag_values(build_parser().parse_args(["serve", "--no-prefix-caching"]))
    assert EngineConfig().with_overrides(overrides).enable_prefix_caching is False
    monkeypatch.setenv("LORAX_ENABLE_PREFIX_CACHING", "0")
    assert EngineConfig().with_env_overrides().enable_prefix_caching is False


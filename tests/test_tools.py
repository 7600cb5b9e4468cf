"""Tools: request parsing, prompts (template-native and fallback), the Hermes call parser (whole and
streamed), and forced calls that always parse and validate, even from a random model."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from lorax_mlflow.api.chat_request import mlflow_chat_request
from lorax_mlflow.api.openai_chat_format import ChatFormatter
from lorax_mlflow.chat.templates import ChatTemplates
from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.service import LoraxService
from lorax_mlflow.tools import hermes
from lorax_mlflow.tools.prompt import renders_hermes_tools
from lorax_mlflow.tools.spec import parse_tools
from tests.engine_support import make_engine
from tests.helpers import build_tiny_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]

# A minimal Hermes-style template that renders tools itself (as Qwen 2.5's does).
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --- request parsing ------------------------------------------------------------------------------


def test_tool_choice_defaults_to_auto_and_none_means_no_tools():
    tools = parse_tools({"tools": TOOLS})
    assert tools.choice == "auto" and not tools.forced and tools.parallel
    assert [f.name for f in tools.functions] == ["get_weather", "get_time"]
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}) is None
    assert parse_tools({"tool_choice": "none"}) is None
    assert parse_tools({}) is None


def test_named_tool_choice_offers_only_that_function():
    tools = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                         "parallel_tool_calls": False})
    assert tools.forced and [f.name for f in tools.offered] == ["get_time"] and not tools.parallel


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "not in tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools", "function tool"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "name"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "distinct"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]}, "tools",
         "not a valid JSON schema"),
        ({"functions": [WEATHER["function"]]}, "functions", "deprecated"),
    ],
)
def test_malformed_tool_fields_are_a_400_naming_the_field(body, param, message):
    with pytest.raises(InvalidRequestError, match=message) as raised:
        parse_tools(body)
    assert raised.value.param == param


# --- prompts --------------------------------------------------------------------------------------


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
]


def test_a_template_without_tool_support_gets_the_fallback_format(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not renders_hermes_tools(tokenizer.chat_template)
    templates = ChatTemplates(tokenizer)
    prompt = tokenizer.decode(templates.render(HISTORY, tools=parse_tools({"tools": TOOLS})))
    assert prompt.startswith("<|im_start|>system\nYou can call functions")
    assert json.dumps(WEATHER) in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}'
            "\n</tool_call><|im_end|>") in prompt
    # both tool results in one user turn, so templates that alternate user/assistant still render
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n21C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_template_that_renders_tools_gets_them_natively(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert renders_hermes_tools(HERMES_TEMPLATE)
    prompt = tokenizer.decode(ChatTemplates(tokenizer, trust_request_templates=True).render(
        HISTORY, chat_template=HERMES_TEMPLATE, tools=parse_tools({"tools": TOOLS})))
    assert prompt.startswith("<|im_start|>system\nTOOLS:get_weather;get_time;")
    assert '"arguments": {"city": "Paris", "days": 1}' in prompt  # an object, not a JSON string
    assert "<|im_start|>tool\nsunny<|im_end|>" in prompt


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
def test_non_text_content_is_a_400_saying_text_only(tiny_model_dir, part):
    from transformers import AutoTokenizer

    templates = ChatTemplates(AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises(InvalidRequestError, match="this model accepts text only") as raised:
        templates.render([{"role": "user", "content": [{"type": "text", "text": "see"}, part]}])
    assert raised.value.param == "messages"


# --- parsing calls out of text ---------------------------------------------------------------------


REPLY = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


def test_parse_splits_content_and_calls():
    parsed = hermes.parse(REPLY, parse_tools({"tools": TOOLS}))
    assert parsed.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Rome", "days": 2}), ("get_time", {"zone": "CET"})]
    assert all(c.id.startswith("call_") for c in parsed.tool_calls)


@pytest.mark.parametrize("text", [
    "<tool_call>\nnot json\n</tool_call>",
    '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}',  # cut by max_tokens
])
def test_a_block_that_is_not_a_call_of_an_offered_function_stays_content(text):
    parsed = hermes.parse(text, parse_tools({"tools": TOOLS}))
    assert parsed.tool_calls == [] and parsed.content == text


def test_streamed_parsing_at_every_split_equals_parsing_the_whole_text():
    tools = parse_tools({"tools": TOOLS})
    whole = hermes.parse(REPLY, tools)
    for size in (1, 2, 3, 5, 11):
        parser = hermes.StreamParser(tools)
        events = []
        for start in range(0, len(REPLY), size):
            events += parser.feed(REPLY[start:start + size])
        events += parser.finish()
        assert "".join(e for e in events if isinstance(e, str)) == whole.content
        assert [(c.name, c.arguments) for c in events if isinstance(c, hermes.ToolCall)] == [
            (c.name, c.arguments) for c in whole.tool_calls]


# --- forced calls on the engine ---------------------------------------------------------------------


def random_schema(rng: random.Random) -> dict:
    """An object schema of 1-4 properties drawn from bounded types (a random model never closes an
    unbounded string), some required, one maybe nested."""
    def leaf() -> dict:
        kind = rng.choice(["integer", "number", "boolean", "enum", "string", "array", "null"])
        if kind == "integer":
            low = rng.randint(-50, 50)
            return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
        if kind == "number":
            return {"type": "number", "minimum": -1, "maximum": 1}
        if kind == "enum":
            return {"enum": rng.sample(["red", "green", "blue", "cyan", "x y", 'q"t'], rng.randint(1, 4))}
        if kind == "string":
            return {"type": "string", "maxLength": rng.randint(1, 6)}
        if kind == "array":
            return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}
        return {"type": kind}

    properties = {f"p{i}_{rng.choice('abcxyz')}": leaf() for i in range(rng.randint(1, 4))}
    if rng.random() < 0.3:
        properties["nested"] = {"type": "object", "properties": {"inner": leaf()}, "required": ["inner"]}
    required = [name for name in properties if rng.random() < 0.7]
    return {"type": "object", "properties": properties, "required": required}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The tiny random Llama with room for tool listings in its prompts (2048 positions)."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_position_embeddings=2048)
    engine = make_engine(model_dir, max_model_len=2048, kv_cache_bytes=32 << 20, max_num_seqs=32)
    yield LoraxService(engine)
    engine.shutdown()


def test_forced_calls_on_20_random_schemas_always_parse_and_validate(service):
    rng = random.Random(1234)
    requests = []
    for i in range(20):
        tools = [{"type": "function", "function": {"name": f"fn_{i}_{j}", "parameters": random_schema(rng)}}
                 for j in range(rng.randint(1, 3))]
        choice = "required" if i % 2 else {"type": "function", "function": {"name": tools[-1]["function"]["name"]}}
        body = {"messages": "Call a function.", "tools": tools, "tool_choice": choice,
                "temperature": 1.0, "seed": i, "parallel_tool_calls": i % 4 == 1}
        prepared = mlflow_chat_request(service, body)
        requests.append((tools, choice, prepared, service.submit(prepared)))
    for tools, choice, prepared, stream in requests:
        response = ChatFormatter(prepared, service.engine.tokenizer, created=0).response(stream.result())
        (choice_out,) = response["choices"]
        assert choice_out["finish_reason"] == "tool_calls", choice_out
        calls = choice_out["message"]["tool_calls"]
        assert calls and choice_out["message"]["content"] is None
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("call_")
            if isinstance(choice, dict):
                assert call["function"]["name"] == choice["function"]["name"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        if not prepared.tools.parallel:
            assert len(calls) == 1
    assert service.engine.core.block_manager.num_free_blocks == service.engine.core.block_manager.num_blocks


def test_forced_tool_choice_with_response_format_is_a_400(service):
    with pytest.raises(InvalidRequestError) as raised:
        mlflow_chat_request(service, {"messages": "hi", "tools": TOOLS, "tool_choice": "required",
                                      "response_format": {"type": "json_object"}})
    assert raised.value.param == "tool_choice"


def test_streamed_forced_call_arrives_as_one_tool_call_delta_then_finish_reason_tool_calls(service):
    prepared = mlflow_chat_request(service, {"messages": "Weather?", "tools": TOOLS, "tool_choice": "required",
                                             "max_tokens": 200, "temperature": 0, "parallel_tool_calls": False})
    formatter = ChatFormatter(prepared, service.engine.tokenizer, created=0)
    chunks = [c for output in service.submit(prepared) if (chunk := formatter.chunk(output)) for c in chunk["choices"]]
    assert chunks[0]["delta"]["role"] == "assistant"
    calls = [call for c in chunks for call in c["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert not any(c["delta"].get("content") for c in chunks)
    assert chunks[-1]["finish_reason"] == "tool_calls"

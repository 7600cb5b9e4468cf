"""LoRAX's native routes in LoRAX's documented shapes: raw HTTP, and the published lorax-client unmodified."""

from __future__ import annotations

import json

import httpx
import lorax
import pytest

from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PROMPT = "Instruct: say something about the sea\nOutput:"


def engine_greedy(served, prompt: str, max_tokens: int, adapter_id: str = ""):
    """Reference: the engine's own greedy output for the same prompt and adapter."""
    engine = served.service.engine
    ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.submit(ids, params, engine.adapters.resolve(AdapterRequest(adapter_id))).result()


def generate(server, parameters: dict, inputs: str = PROMPT, route: str = "/generate") -> httpx.Response:
    return httpx.post(server.url + route, json={"inputs": inputs, "parameters": parameters}, timeout=120)


def stream_events(server, parameters: dict, inputs: str = PROMPT) -> list[dict]:
    with httpx.stream("POST", server.url + "/generate_stream",
                      json={"inputs": inputs, "parameters": parameters}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [json.loads(line[len("data:"):]) for line in response.iter_lines() if line.startswith("data:")]


# ----- /generate -----------------------------------------------------------------------------------


def test_generate_greedy_equals_the_engine_output_with_token_details(server, served):
    response = generate(server, {"adapter_id": "a", "max_new_tokens": 8, "ignore_eos_token": True, "details": True})
    assert response.status_code == 200
    body = response.json()
    reference = engine_greedy(served, PROMPT, 8, "a").outputs[0]
    assert body["generated_text"] == reference.text
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 8
    assert details["prompt_tokens"] == len(served.service.engine.tokenizer.encode(PROMPT))
    assert [t["id"] for t in details["tokens"]] == reference.token_ids
    assert all(isinstance(t["logprob"], float) and t["special"] is False for t in details["tokens"])
    assert details["seed"] is None and details["prefill"] == []


def test_generate_without_details_answers_only_the_text(server):
    body = generate(server, {"max_new_tokens": 3}).json()
    assert set(body) == {"generated_text"}


def test_return_full_text_prepends_the_inputs(server):
    plain = generate(server, {"adapter_id": "b", "max_new_tokens": 4}).json()["generated_text"]
    full = generate(server, {"adapter_id": "b", "max_new_tokens": 4, "return_full_text": True}).json()
    assert full["generated_text"] == PROMPT + plain


def test_decoder_input_details_returns_the_prompt_tokens_with_logprobs(server, served):
    details = generate(server, {"max_new_tokens": 2, "details": True, "decoder_input_details": True}).json()["details"]
    ids = served.service.engine.tokenizer.encode(PROMPT)
    assert [t["id"] for t in details["prefill"]] == ids
    assert details["prefill"][0]["logprob"] is None
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in details["prefill"][1:])


def test_return_k_alternatives_lists_the_top_tokens_with_the_greedy_choice_first(server):
    details = generate(server, {"max_new_tokens": 3, "details": True, "return_k_alternatives": 3}).json()["details"]
    for token in details["tokens"]:
        assert len(token["alternative_tokens"]) == 3
        assert token["alternative_tokens"][0]["id"] == token["id"]


def test_stop_sequence_ends_generation_with_finish_reason_stop_sequence(server):
    full = generate(server, {"max_new_tokens": 12, "ignore_eos_token": True}).json()["generated_text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = generate(server, {"max_new_tokens": 12, "ignore_eos_token": True, "stop": [stop], "details": True}).json()
    assert cut["generated_text"] == full[: full.index(stop)]
    assert cut["details"]["finish_reason"] == "stop_sequence"


def test_sampling_reports_its_seed_and_the_seed_reproduces_the_text(server):
    first = generate(server, {"do_sample": True, "max_new_tokens": 6, "details": True}).json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = generate(server, {"do_sample": True, "max_new_tokens": 6, "seed": seed}).json()
    assert again["generated_text"] == first["generated_text"]


def test_best_of_returns_the_most_likely_sequence_and_the_others(server):
    details = generate(server, {"do_sample": True, "best_of": 3, "max_new_tokens": 4, "ignore_eos_token": True,
                                "details": True}).json()["details"]
    others = details["best_of_sequences"]
    assert len(others) == 2

    def total(sequence):
        return sum(t["logprob"] for t in sequence["tokens"])

    assert all(total(details) >= total(o) - 1e-4 for o in others)


def test_truncate_keeps_the_last_prompt_tokens(server):
    details = generate(server, {"max_new_tokens": 2, "truncate": 3, "details": True}).json()["details"]
    assert details["prompt_tokens"] == 3


# ----- /generate_stream ----------------------------------------------------------------------------


def test_generate_stream_sends_one_event_per_token_and_the_text_at_the_end(server, served):
    events = stream_events(server, {"adapter_id": "a", "max_new_tokens": 8, "ignore_eos_token": True,
                                    "details": True})
    reference = engine_greedy(served, PROMPT, 8, "a").outputs[0]
    assert [e["token"]["id"] for e in events] == reference.token_ids
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == reference.text == "".join(e["token"]["text"] for e in events)
    prompt_tokens = len(served.service.engine.tokenizer.encode(PROMPT))
    assert events[-1]["details"] == {"finish_reason": "length", "prompt_tokens": prompt_tokens,
                                     "generated_tokens": 8, "seed": None}


def test_root_route_serves_lorax_clients_generate_as_a_list(server):
    response = httpx.post(server.url + "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    single = generate(server, {"max_new_tokens": 3}).json()
    assert response.json() == [single]


# ----- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "status"),
    [
        ({"do_sample": True, "temperature": 9.0}, 400),
        ({"watermark": True}, 400),
        ({"best_of": 2}, 400),  # best_of needs sampling
        ({"unknown_field": 1}, 400),
        ({"max_new_tokens": 100000}, 400),
    ],
)
def test_invalid_parameters_answer_in_loraxs_error_shape(server, parameters, status):
    response = generate(server, parameters)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "error_type"}
    assert response.json()["error_type"] == "validation"


def test_unknown_adapter_answers_404_in_loraxs_shape(server, adapter_root):
    response = generate(server, {"adapter_id": str(adapter_root / "missing"), "max_new_tokens": 2})
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"


def test_malformed_json_answers_400_in_loraxs_shape(server):
    for route in ("/generate", "/generate_stream", "/"):
        response = httpx.post(server.url + route, content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error_type"] == "validation"


# ----- lorax-client, unmodified --------------------------------------------------------------------


def test_lorax_client_generate(server, served):
    client = lorax.Client(server.url)
    response = client.generate(PROMPT, adapter_id="a", max_new_tokens=8, ignore_eos_token=True)
    reference = engine_greedy(served, PROMPT, 8, "a").outputs[0]
    assert response.generated_text == reference.text
    assert response.details.generated_tokens == 8
    assert response.details.finish_reason == "length"


def test_lorax_client_generate_stream(server, served):
    client = lorax.Client(server.url)
    responses = list(client.generate_stream(PROMPT, adapter_id="b", max_new_tokens=6, ignore_eos_token=True))
    reference = engine_greedy(served, PROMPT, 6, "b").outputs[0]
    text = "".join(r.token.text for r in responses if not r.token.special)
    assert text == responses[-1].generated_text == reference.text
    assert responses[-1].details.generated_tokens == 6


def test_lorax_client_raises_its_own_errors(server, adapter_root):
    client = lorax.Client(server.url)
    with pytest.raises(lorax.errors.ValidationError):
        client.generate(PROMPT, max_new_tokens=100000)
    with pytest.raises(lorax.errors.NotFoundError):
        client.generate(PROMPT, adapter_id=str(adapter_root / "missing"), max_new_tokens=2)


def test_lorax_client_json_response_format(server):
    client = lorax.Client(server.url)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response = client.generate(PROMPT, max_new_tokens=20, response_format={"type": "json_object", "schema": schema})
    assert isinstance(json.loads(response.generated_text)["ok"], bool)

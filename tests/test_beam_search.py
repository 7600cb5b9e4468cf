"""Beam search in the engine (`use_beam_search`, `best_of` = width, `length_penalty`, `early_stopping`).

Its beams are one group of sequences in the engine: the prompt is prefilled once, the beams share its
KV blocks and fork copy-on-write. It gives what Hugging Face `generate(num_beams=W, do_sample=False,
length_penalty, early_stopping)` gives in fp32 (token for token, scores included), on the tiny model
and on the embedded SmolLM2, with prefix caching on and off, in batches with other requests and
adapters, and through preemption; aborted or finished, it leaves every KV block free.
"""

from __future__ import annotations

import logging
import time

import msgspec
import openai
import pytest
import torch
from peft import PeftModel

from lorax_mlflow.api.chat_request import mlflow_chat_request
from lorax_mlflow.api.completion_request import completion_requests
from lorax_mlflow.api.schemas import CompletionRequest, parse_request
from lorax_mlflow.engine.messages import AddRequest, ClientMessage
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import ContextLengthError, InvalidRequestError
from lorax_mlflow.service import LoraxService
from tests.engine_support import PROMPTS, adapter, encode, load_hf, make_engine


def beam(width: int, max_tokens: int, n: int | None = None, **fields) -> SamplingParams:
    return SamplingParams(use_beam_search=True, best_of=width, n=n or width, max_tokens=max_tokens, **fields)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def prepare(service: LoraxService, body: dict):
    """A /v1/completions body as the server prepares it."""
    return completion_requests(service, parse_request(CompletionRequest, body))


def hf_beams(hf_model, prompt_ids: list[int], *, width: int, max_tokens: int, stop_ids: list[int],
             length_penalty: float = 1.0, early_stopping=False) -> list[tuple[list[int], float]]:
    """HF's beams: (generated tokens cut after the first stop token, normalised score), best first."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), num_beams=width, num_return_sequences=width,
                                do_sample=False, max_new_tokens=max_tokens, length_penalty=length_penalty,
                                early_stopping=early_stopping, eos_token_id=stop_ids, pad_token_id=2,
                                output_scores=True, return_dict_in_generate=True)
    beams = []
    for sequence, score in zip(out.sequences[:, len(prompt_ids):].tolist(), out.sequences_scores.tolist()):
        cut = next((i + 1 for i, t in enumerate(sequence) if t in stop_ids), len(sequence))
        beams.append((sequence[:cut], score))
    return beams


def assert_equal_to_hf(outputs, reference, length_penalty: float = 1.0) -> None:
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in reference]
    for output, (tokens, score) in zip(outputs, reference):
        assert output.cumulative_logprob / len(tokens) ** length_penalty == pytest.approx(score, abs=1e-4)


def all_blocks_free(engine, timeout: float = 10.0) -> bool:
    """Whether every KV block is free (nobody holds one) once the core has caught up."""
    manager = engine.core.block_manager
    deadline = time.time() + timeout
    while not (free := manager.num_free_blocks == manager.num_blocks and not any(manager.ref_counts)):
        if time.time() >= deadline:
            break
        time.sleep(0.01)
    return free


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-cache", "no-prefix-cache"])
def engine(request, tiny_model_dir, adapter_root, tiny_adapters):
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root], enable_prefix_caching=request.param)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def service(engine) -> LoraxService:
    return LoraxService(engine)


# --- what HF generate(num_beams=...) gives ----------------------------------------------------------


@pytest.mark.parametrize("prompt, width", [(PROMPTS[0], 4), (PROMPTS[1], 2), (PROMPTS[2], 5)])
def test_beams_equal_hf_generate_num_beams(engine, hf_model, tiny_model_dir, prompt, width):
    ids = encode(tiny_model_dir, prompt)
    outputs = engine.submit(ids, beam(width, 8)).result().outputs
    assert_equal_to_hf(outputs, hf_beams(hf_model, ids, width=width, max_tokens=8, stop_ids=[2]))
    assert all(o.finish_reason == "length" for o in outputs)
    assert all_blocks_free(engine)


@pytest.mark.parametrize("length_penalty, early_stopping", [
    (1.0, False), (0.0, True), (2.0, False), (1.0, "never"), (-1.0, "never"), (0.5, True),
])
def test_finished_beams_score_and_stop_as_in_hf(engine, hf_model, tiny_model_dir, length_penalty, early_stopping):
    """A frequent token made a stop token (stop_token_ids / HF eos_token_id) makes beams finish early."""
    ids = encode(tiny_model_dir, PROMPTS[3])
    stop = engine.submit(ids, greedy(1)).result().outputs[0].token_ids[0]  # likeliest first token: beams stop at once
    outputs = engine.submit(ids, beam(3, 12, stop_token_ids=[stop], length_penalty=length_penalty,
                                      early_stopping=early_stopping)).result().outputs
    reference = hf_beams(hf_model, ids, width=3, max_tokens=12, stop_ids=[2, stop], length_penalty=length_penalty,
                         early_stopping=early_stopping)
    assert_equal_to_hf(outputs, reference, length_penalty)
    if length_penalty == 0.0:  # raw sums favour the short finished beams
        assert outputs[0].finish_reason == "stop"
    assert all((o.finish_reason == "stop") == (o.token_ids[-1] == stop) for o in outputs)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_best_beam_is_at_least_as_likely_as_the_greedy_sequence(service, engine, tiny_model_dir, prompt):
    greedy_output = engine.submit(encode(tiny_model_dir, prompt), greedy(10)).result().outputs[0]
    (prepared,) = prepare(service, {"prompt": prompt, "use_beam_search": True, "best_of": 4,
                                    "max_tokens": 10, "length_penalty": 0.0, "early_stopping": "never"})
    (best,) = service.submit(prepared).result().outputs
    assert len(best.token_ids) == len(greedy_output.token_ids) or best.finish_reason == "stop"
    assert best.cumulative_logprob >= greedy_output.cumulative_logprob - 1e-5


def test_logprobs_are_each_beams_own_as_hf_computes_them(engine, hf_model, tiny_model_dir):
    """Each token's logprob and its beam's top alternatives at that step, and the prompt's (echo)."""
    ids = encode(tiny_model_dir, PROMPTS[2])
    output = engine.submit(ids, beam(3, 6, logprobs=3, prompt_logprobs=2)).result()
    for beam_output in output.outputs:
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + beam_output.token_ids])).logits[0]
        reference = torch.log_softmax(logits.float(), dim=-1)[len(ids) - 1 : -1]
        entries = beam_output.logprobs
        assert [e.token_id for e in entries] == beam_output.token_ids
        assert [e.logprob for e in entries] == pytest.approx(
            reference.gather(1, torch.tensor(beam_output.token_ids)[:, None])[:, 0].tolist(), abs=1e-4)
        assert sum(e.logprob for e in entries) == pytest.approx(beam_output.cumulative_logprob, abs=1e-4)
        top_values, top_ids = reference.topk(3, dim=-1)
        assert [[t for t, _ in e.top] for e in entries] == top_ids.tolist()
        assert [v for e in entries for _, v in e.top] == pytest.approx(top_values.flatten().tolist(), abs=1e-4)
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(ids)
    assert [p.token_id for p in output.prompt_logprobs[1:]] == ids[1:]


def test_n_returns_the_n_best_of_the_width(engine, tiny_model_dir):
    ids = encode(tiny_model_dir, PROMPTS[4])
    four = engine.submit(ids, beam(4, 6)).result().outputs
    two = engine.submit(ids, beam(4, 6, n=2)).result().outputs
    assert [o.index for o in two] == [0, 1]
    assert [o.token_ids for o in two] == [o.token_ids for o in four[:2]]


def test_ignore_eos_keeps_eos_out_of_the_beams_as_hf_suppress_tokens(engine, hf_model, tiny_model_dir):
    ids = encode(tiny_model_dir, PROMPTS[0])
    outputs = engine.submit(ids, beam(3, 6, ignore_eos=True)).result().outputs
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), num_beams=3, num_return_sequences=3, do_sample=False,
                                max_new_tokens=6, suppress_tokens=[2], eos_token_id=None, pad_token_id=2)
    assert [o.token_ids for o in outputs] == out[:, len(ids):].tolist()


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in fp32: the engine and transformers."""
    from transformers import AutoModelForCausalLM

    from lorax_mlflow.default_model import default_model_path

    path = default_model_path()
    engine = make_engine(path, dtype="float32", max_model_len=512, kv_cache_bytes=64 << 20)
    yield engine, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("question, width, length_penalty, early_stopping", [
    ("What is the capital of France?", 4, 1.0, False),  # its best beams end with EOS
    ("Name three colours.", 3, 0.6, True),
    ("Say hi.", 2, 1.0, "never"),
])
def test_beams_on_the_embedded_smollm2_equal_hf_generate(smollm2, question, width, length_penalty, early_stopping):
    """A real model's chat answers end with EOS (<|im_end|>), so beams finish as HF's do."""
    engine, hf_model = smollm2
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    params = beam(width, 24, length_penalty=length_penalty, early_stopping=early_stopping)
    outputs = engine.submit(ids, params).result().outputs
    reference = hf_beams(hf_model, ids, width=width, max_tokens=24, stop_ids=sorted(engine.eos_token_ids),
                         length_penalty=length_penalty, early_stopping=early_stopping)
    assert_equal_to_hf(outputs, reference, length_penalty)
    assert all((o.finish_reason == "stop") == (o.token_ids[-1] in engine.eos_token_ids) for o in outputs)
    assert all(o.text and "<|im_end|>" not in o.text for o in outputs)
    assert any(o.finish_reason == "stop" for o in outputs)
    assert all_blocks_free(engine)


# --- in the engine: shared blocks, batches, adapters, preemption, abort -----------------------------


def test_the_prompt_is_prefilled_once_and_the_beams_share_its_blocks(engine, tiny_model_dir, monkeypatch):
    ids = encode(tiny_model_dir, " ".join(PROMPTS) + " and beams")  # a few full blocks, never cached before
    steps = []
    execute = engine.core.runner.execute

    def recording_execute(scheduled, *args, **kwargs):
        steps.append([(item.num_new_tokens, list(item.seq.block_table)) for item in scheduled])
        return execute(scheduled, *args, **kwargs)

    monkeypatch.setattr(engine.core.runner, "execute", recording_execute)
    engine.submit(ids, beam(4, 5)).result()
    prefill, *decodes = steps
    full = len(ids) // engine.info.block_size
    assert [fed for fed, _ in prefill] == [len(ids)]  # one sequence prefills the prompt
    assert all([fed for fed, _ in step] == [1, 1, 1, 1] for step in decodes)
    prompt_blocks = prefill[0][1][:full]
    for step in decodes:
        assert all(table[:full] == prompt_blocks for _, table in step)  # one copy of the prompt's K/V
    assert all_blocks_free(engine)


def test_beams_under_an_adapter_equal_hf_generate_of_the_peft_model(engine, tiny_model_dir, tiny_adapters):
    ids = encode(tiny_model_dir, PROMPTS[1])
    outputs = engine.submit(ids, beam(3, 8), adapter(str(tiny_adapters["b"]))).result().outputs
    peft_model = PeftModel.from_pretrained(load_hf(tiny_model_dir), tiny_adapters["b"]).eval()
    assert_equal_to_hf(outputs, hf_beams(peft_model, ids, width=3, max_tokens=8, stop_ids=[2]))
    assert all_blocks_free(engine) and not any(engine.core.slots.refs)


def test_beams_in_a_batch_with_other_requests_and_adapters_equal_each_alone(engine, tiny_model_dir, tiny_adapters):
    ids = [encode(tiny_model_dir, p) for p in PROMPTS]
    a, b, c = (adapter(str(tiny_adapters[name])) for name in "abc")
    jobs = [
        (ids[0], beam(4, 10), None),
        (ids[1], greedy(12), None),
        (ids[2], beam(3, 8, length_penalty=0.5), a),
        (ids[3], SamplingParams(max_tokens=12, temperature=0.8, seed=5, n=2), b),
        (ids[4], beam(2, 12, early_stopping=True), b),
        (ids[0], beam(4, 10), c),
    ]
    alone = [engine.submit(prompt, params, which).result().outputs for prompt, params, which in jobs]
    streams = [engine.submit(prompt, params, which) for prompt, params, which in jobs]
    together = [stream.result().outputs for stream in streams]
    for one, batched in zip(alone, together):
        assert [o.token_ids for o in batched] == [o.token_ids for o in one]
        assert [o.cumulative_logprob for o in batched] == pytest.approx([o.cumulative_logprob for o in one], abs=1e-4)
    assert alone[0][0].token_ids != alone[5][0].token_ids  # the adapter changed the beams
    assert all_blocks_free(engine) and not any(engine.core.slots.refs)


def test_preempted_beam_searches_start_over_and_give_the_same_beams(tiny_model_dir, caplog):
    ids = [encode(tiny_model_dir, p) for p in PROMPTS]
    jobs = [(ids[i % 5], beam(4, 40, ignore_eos=True) if i % 2 == 0 else greedy(40)) for i in range(6)]
    roomy = make_engine(tiny_model_dir)
    try:
        expected = [roomy.submit(prompt, params).result().outputs for prompt, params in jobs]
    finally:
        roomy.shutdown()
    tight = make_engine(tiny_model_dir, kv_cache_bytes=256 << 10)  # 32 blocks of 16 tokens: not all at once
    try:
        with caplog.at_level(logging.DEBUG, logger="lorax_mlflow.engine.scheduler"):
            streams = [tight.submit(prompt, params) for prompt, params in jobs]
            outputs = [stream.result().outputs for stream in streams]
        assert any("preempting the beam search" in record.getMessage() for record in caplog.records)
        for got, want in zip(outputs, expected):
            assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert all_blocks_free(tight)
    finally:
        tight.shutdown()


def test_beams_equal_hf_with_chunked_prefill_and_speculating_neighbours(tiny_model_dir, hf_model):
    """The prompt prefilled in chunks; other requests speculate (prompt lookup) beside the beams, which never do."""
    engine = make_engine(tiny_model_dir, max_num_batched_tokens=16, prefill_chunk_tokens=8, speculative_tokens=2)
    try:
        long_prompt = encode(tiny_model_dir, " ".join(PROMPTS))
        neighbours = [engine.submit(encode(tiny_model_dir, p), greedy(16)) for p in PROMPTS[:3]]
        outputs = engine.submit(long_prompt, beam(4, 10)).result().outputs
        assert_equal_to_hf(outputs, hf_beams(hf_model, long_prompt, width=4, max_tokens=10, stop_ids=[2]))
        assert all(stream.result().finished for stream in neighbours)
        assert sum(engine.stats().speculative_draft_tokens.values()) > 0
        assert all_blocks_free(engine)
    finally:
        engine.shutdown()


def test_abort_mid_search_frees_every_block(engine, tiny_model_dir):
    stream = engine.submit(encode(tiny_model_dir, PROMPTS[2]), beam(4, 200, ignore_eos=True))
    deadline = time.time() + 30
    request = None
    while time.time() < deadline:  # wait until the search has forked its beams and is stepping
        request = engine.core._requests.get(stream.request_id)
        if request is not None and len(request.sequences) == 4 and request.sequences[0].num_output_tokens > 3:
            break
        time.sleep(0.005)
    assert request is not None and not request.finished
    stream.abort()
    assert all_blocks_free(engine)
    assert not engine.core.scheduler.running and stream.request_id not in engine.core._requests


def test_a_finished_search_leaves_every_block_free(engine, tiny_model_dir):
    stream = engine.submit(encode(tiny_model_dir, PROMPTS[1]), beam(6, 20))
    assert stream.result().finished
    assert all_blocks_free(engine, timeout=0.0)


def test_beam_parameters_cross_the_wire_to_the_core():
    params = beam(3, 7, n=2, length_penalty=0.25, early_stopping="never")
    encoded = msgspec.msgpack.encode(AddRequest.of("r", [1, 2], params, None))
    decoded = msgspec.msgpack.decode(encoded, type=ClientMessage)
    assert decoded.sampling_params() == params


# --- the request API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, param", [
    ({"best_of": 17}, "best_of"),
    ({"best_of": 2, "n": 3}, "best_of"),
    ({"best_of": 2, "early_stopping": "sometimes"}, "early_stopping"),
    ({"best_of": 2, "length_penalty": "long"}, "length_penalty"),
    ({"best_of": 2, "length_penalty": 100}, "length_penalty"),
    ({"best_of": 2, "stop": ["x"]}, "stop"),
    ({"best_of": 2, "guided_regex": "a+"}, "guided_regex"),
])
def test_what_beam_search_cannot_honour_is_a_400(service, fields, param):
    with pytest.raises(InvalidRequestError) as raised:
        for prepared in prepare(service, {"prompt": "Hi", "use_beam_search": True, "max_tokens": 4, **fields}):
            service.submit(prepared).abort()
    assert raised.value.param == param


def test_the_engine_refuses_beam_parameters_it_cannot_honour_from_any_caller():
    with pytest.raises(InvalidRequestError) as raised:
        beam(2, 4, early_stopping=1).validate()
    assert raised.value.param == "early_stopping"


def test_a_search_that_may_not_fit_the_kv_cache_is_refused(tiny_model_dir):
    small = make_engine(tiny_model_dir, kv_cache_bytes=128 << 10)  # 16 blocks
    try:
        with pytest.raises(ContextLengthError) as raised:
            small.submit(encode(tiny_model_dir, PROMPTS[0]), beam(8, 40))
        assert raised.value.param == "best_of"
    finally:
        small.shutdown()


def test_without_use_beam_search_length_penalty_and_early_stopping_are_ignored(service):
    (prepared,) = prepare(service, {"prompt": "Hi", "max_tokens": 4, "length_penalty": 100.0,
                                    "early_stopping": "never"})
    assert not prepared.params.use_beam_search


def test_beam_search_over_http_on_chat_and_completions(server):
    client = openai.OpenAI(api_key="EMPTY", base_url=server.v1, max_retries=0)
    extra = {"use_beam_search": True, "best_of": 3, "length_penalty": 1.0, "early_stopping": True}
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=6, temperature=0, extra_body=extra)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message.content != chat.choices[1].message.content
    completion = client.completions.create(model="a", prompt="Once upon a time", max_tokens=6, temperature=0,
                                           extra_body=extra)
    streamed = list(client.completions.create(model="a", prompt="Once upon a time", max_tokens=6, temperature=0,
                                              stream=True, extra_body=extra))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == completion.choices[0].text
    with_logprobs = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=6, logprobs=True, top_logprobs=2, extra_body=extra)
    content = with_logprobs.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 2 for entry in content)
    echoed = client.completions.create(model="a", prompt="Once upon a time", max_tokens=6, logprobs=1, echo=True,
                                       extra_body=extra)
    logprobs = echoed.choices[0].logprobs
    assert echoed.choices[0].text.startswith("Once upon a time")
    assert "".join(logprobs.tokens).startswith(" upon a time") and len(logprobs.tokens) > 6  # the prompt's, then the beam's


def test_beam_search_through_predict_custom_inputs(served):
    """MLflow's predict (and /invocations) carry the beam fields in custom_inputs."""
    beam_fields = {"use_beam_search": True, "best_of": 3, "length_penalty": 0.5, "early_stopping": "never"}
    response = served.predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "n": 2,
                               "custom_inputs": {"adapter_id": "a", **beam_fields}})
    prepared = mlflow_chat_request(served.service, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                                                    "n": 2, "adapter_id": "a", **beam_fields})
    expected = served.service.submit(prepared).result().outputs
    assert [choice["message"]["content"] for choice in response["choices"]] == [o.text for o in expected]

"""Beam search (`use_beam_search`, `best_of` = width, `length_penalty`, `early_stopping`) against
Hugging Face `generate(num_beams=...)` on the tiny model in fp32, and against greedy decoding."""

from __future__ import annotations

import openai
import pytest
import torch

from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.service import LoraxService
from tests.engine_support import PROMPTS, encode


@pytest.fixture(scope="module")
def service(engine) -> LoraxService:
    return LoraxService(engine)


def run_beams(service: LoraxService, prompt: str, **fields):
    (prepared,) = service.prepare_completions({"prompt": prompt, "use_beam_search": True, "temperature": 0, **fields})
    return service.submit(prepared).result().outputs


def hf_beams(hf_model, prompt_ids: list[int], *, width: int, max_tokens: int, stop_ids: list[int],
             length_penalty: float = 1.0, early_stopping=False):
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


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_beams_equal_hf_generate_num_beams_without_stop_tokens(service, hf_model, tiny_model_dir, prompt):
    outputs = run_beams(service, prompt, best_of=4, n=4, max_tokens=8)
    reference = hf_beams(hf_model, encode(tiny_model_dir, prompt), width=4, max_tokens=8, stop_ids=[2])
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in reference]
    for output, (tokens, score) in zip(outputs, reference):
        assert output.cumulative_logprob / len(tokens) == pytest.approx(score, abs=1e-4)
        assert output.finish_reason == "length"


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.0, True), (2.0, False), (1.0, "never")])
def test_finished_beams_score_and_stop_as_in_hf(service, hf_model, tiny_model_dir, length_penalty, early_stopping):
    """A frequent token made a stop token (stop_token_ids / HF eos_token_id) makes beams finish early."""
    prompt = PROMPTS[3]
    ids = encode(tiny_model_dir, prompt)
    greedy = service.engine.submit(ids, _greedy(12), None).result().outputs[0].token_ids
    stop = greedy[0]  # the likeliest first token: beams finish from the first step on
    outputs = run_beams(service, prompt, best_of=3, n=3, max_tokens=12, stop_token_ids=[stop],
                        length_penalty=length_penalty, early_stopping=early_stopping)
    reference = hf_beams(hf_model, ids, width=3, max_tokens=12, stop_ids=[2, stop], length_penalty=length_penalty,
                         early_stopping=early_stopping)
    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in reference]
    if length_penalty == 0.0:  # raw sums favour the short finished beams
        assert outputs[0].finish_reason == "stop"
    for output, (tokens, score) in zip(outputs, reference):
        assert output.cumulative_logprob / len(tokens) ** length_penalty == pytest.approx(score, abs=1e-4)


def _greedy(max_tokens: int):
    from lorax_mlflow.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_best_beam_is_at_least_as_likely_as_the_greedy_sequence(service, tiny_model_dir, prompt):
    greedy = service.engine.submit(encode(tiny_model_dir, prompt), _greedy(10), None).result().outputs[0]
    (best,) = run_beams(service, prompt, best_of=4, max_tokens=10, length_penalty=0.0)
    assert len(best.token_ids) == len(greedy.token_ids) or best.finish_reason == "stop"
    assert best.cumulative_logprob >= greedy.cumulative_logprob - 1e-5


@pytest.mark.parametrize("fields, param", [
    ({"best_of": 11}, "best_of"),
    ({"best_of": 2, "n": 3}, "best_of"),
    ({"best_of": 2, "early_stopping": "sometimes"}, "early_stopping"),
    ({"best_of": 2, "logprobs": 1}, "logprobs"),
    ({"best_of": 2, "stop": ["x"]}, "stop"),
    ({"best_of": 2, "guided_regex": "a+"}, "guided_regex"),
])
def test_what_beam_search_cannot_honour_is_a_400(service, fields, param):
    with pytest.raises(InvalidRequestError) as raised:
        service.prepare_completions({"prompt": "Hi", "use_beam_search": True, "max_tokens": 4, **fields})
    assert raised.value.param == param


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

"""Generation through the engine: n / best_of over shared prompt blocks, logprobs, JSON output,
sampler parameters, stop strings and special tokens, each checked against a plain reference."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.structured import ResponseFormat, parse_response_format
from tests.engine_support import PROMPTS, encode, greedy, hf_greedy, make_engine

SEEDED = dict(temperature=1.0, top_p=0.9, ignore_eos=True)
IM_START = 1  # <|im_start|>: a special token that is not EOS


@pytest.fixture(scope="module")
def prompt_40(tiny_model_dir) -> list[int]:
    """40 tokens: two full blocks of 16 and a partly filled third one."""
    tokens = encode(tiny_model_dir, " ".join(PROMPTS)) * 3
    return tokens[:40]


def run(engine, prompt: list[int], params: SamplingParams):
    return engine.submit(prompt, params).result()


def tokens_of(engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return run(engine, prompt, params).outputs[0].token_ids


@torch.no_grad()
def hf_log_softmax(hf_model, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), V]: log_softmax of a plain HF forward, row i = distribution of token i + 1."""
    return torch.log_softmax(hf_model(torch.tensor([token_ids])).logits[0].float(), dim=-1)


def record_steps(engine, monkeypatch) -> list[dict]:
    """Wrap the runner so each step records what it fed and the block tables it saw."""
    steps: list[dict] = []
    execute = engine.core.runner.execute
    manager = engine.core.block_manager

    def recording_execute(scheduled, slot_ranks, *args, **kwargs):
        steps.append({
            "fed": [item.num_new_tokens for item in scheduled],
            "logits_from": [item.logits_from for item in scheduled],
            "tables": [list(item.seq.block_table) for item in scheduled],
            "ref_counts": {b: manager.ref_counts[b] for item in scheduled for b in item.seq.block_table},
            "used": manager.num_blocks - manager.num_free_blocks,
        })
        return execute(scheduled, slot_ranks, *args, **kwargs)

    monkeypatch.setattr(engine.core.runner, "execute", recording_execute)
    return steps


# --- n and best_of ----------------------------------------------------------------------------------


def test_n_prefills_the_prompt_once_and_shares_its_blocks_until_copy_on_write(engine, prompt_40, monkeypatch):
    steps = record_steps(engine, monkeypatch)
    out = run(engine, prompt_40, SamplingParams(n=3, max_tokens=20, seed=3, **SEEDED))

    prefill, first_decode = steps[0], steps[1]
    assert prefill["fed"] == [40, 0, 0]  # the prompt is fed once; the siblings reuse its logits
    assert prefill["logits_from"][1] is prefill["logits_from"][2] is not None
    assert prefill["tables"][0] == prefill["tables"][1] == prefill["tables"][2]
    assert len(prefill["tables"][0]) == 3 and prefill["used"] == 3  # allocated once, not 3 times
    assert set(prefill["ref_counts"].values()) == {3}

    # The first decode writes position 40, inside the shared third block: two of the three get a copy.
    assert first_decode["fed"] == [1, 1, 1]
    full_blocks = {tuple(table[:2]) for table in first_decode["tables"]}
    assert full_blocks == {tuple(prefill["tables"][0][:2])}
    assert len({table[2] for table in first_decode["tables"]}) == 3
    assert first_decode["used"] == 5
    assert [first_decode["ref_counts"][b] for b in prefill["tables"][0][:2]] == [3, 3]

    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 3
    assert all(len(o.token_ids) == 20 and o.finish_reason == "length" for o in out.outputs)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def test_seeded_choice_i_equals_a_single_request_seeded_with_seed_plus_i(engine, prompt_40):
    """Copy-on-write check: a sibling writing into a shared block would change the others' tokens."""
    params = dict(max_tokens=24, **SEEDED)
    choices = [o.token_ids for o in run(engine, prompt_40, SamplingParams(n=3, seed=100, **params)).outputs]
    alone = [tokens_of(engine, prompt_40, SamplingParams(seed=100 + i, **params)) for i in range(3)]
    again = [o.token_ids for o in run(engine, prompt_40, SamplingParams(n=3, seed=100, **params)).outputs]
    assert choices == alone == again


def test_sibling_seeds_wrap_around_the_64_bit_seed_range(engine, prompt_40):
    params = dict(max_tokens=6, **SEEDED)
    choices = [o.token_ids for o in run(engine, prompt_40, SamplingParams(n=2, seed=2**64 - 1, **params)).outputs]
    assert choices == [tokens_of(engine, prompt_40, SamplingParams(seed=-1, **params)),
                       tokens_of(engine, prompt_40, SamplingParams(seed=0, **params))]


def test_greedy_n_gives_n_copies_of_the_greedy_output(engine, hf_model, prompt_40):
    out = run(engine, prompt_40, greedy(16, n=3))
    expected = hf_greedy(hf_model, prompt_40, 16)
    assert [o.token_ids for o in out.outputs] == [expected] * 3
    assert len({o.text for o in out.outputs}) == 1


def test_n_siblings_survive_preemption_under_a_tiny_kv_cache(tiny_model_dir, prompt_40):
    # 12 blocks: an n=3 request of 80 tokens needs 11, so the other requests force preemptions.
    engine = make_engine(tiny_model_dir, kv_cache_bytes=12 * 16 * 2 * 2 * 2 * 16 * 4)
    try:
        params = dict(max_tokens=40, temperature=1.0, ignore_eos=True)
        alone = [tokens_of(engine, prompt_40, SamplingParams(seed=5 + i, **params)) for i in range(3)]
        others = [engine.submit(encode(tiny_model_dir, p), SamplingParams(seed=1, **params)) for p in PROMPTS[:2]]
        shared = engine.submit(prompt_40, SamplingParams(n=3, seed=5, **params))
        others += [engine.submit(encode(tiny_model_dir, p), SamplingParams(seed=1, **params)) for p in PROMPTS[2:]]
        assert [o.token_ids for o in shared.result().outputs] == alone
        for stream in others:
            stream.result()
        assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks
    finally:
        engine.shutdown()


@pytest.mark.parametrize("n", [1, 2])
def test_best_of_returns_the_sequences_with_the_highest_cumulative_logprob(engine, prompt_40, n):
    params = dict(max_tokens=10, **SEEDED)
    candidates = [run(engine, prompt_40, SamplingParams(seed=40 + i, **params)).outputs[0] for i in range(3)]
    ranked = sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)

    snapshots = list(engine.submit(prompt_40, SamplingParams(n=n, best_of=3, seed=40, **params)))

    assert len(snapshots) == 1 and snapshots[0].finished  # ranking needs every candidate: nothing streams early
    chosen = snapshots[0].outputs
    assert [o.index for o in chosen] == list(range(n))
    assert [o.token_ids for o in chosen] == [c.token_ids for c in ranked[:n]]
    assert [o.cumulative_logprob for o in chosen] == pytest.approx([c.cumulative_logprob for c in ranked[:n]])


def test_more_sequences_than_a_batch_holds_is_a_400(tiny_model_dir, prompt_40):
    engine = make_engine(tiny_model_dir, max_num_seqs=2)
    try:
        with pytest.raises(InvalidRequestError) as n_error:
            engine.submit(prompt_40, greedy(4, n=3))
        with pytest.raises(InvalidRequestError) as best_of_error:
            engine.submit(prompt_40, greedy(4, best_of=3))
        assert (n_error.value.param, best_of_error.value.param) == ("n", "best_of")
        assert len(run(engine, prompt_40, greedy(4, n=2)).outputs) == 2
    finally:
        engine.shutdown()


# --- logprobs ---------------------------------------------------------------------------------------


def test_logprobs_and_top_logprobs_equal_log_softmax_of_the_model_logits(engine, hf_model, tiny_model_dir):
    prompt = encode(tiny_model_dir, PROMPTS[0])
    out = run(engine, prompt, SamplingParams(max_tokens=8, seed=9, logprobs=5, **SEEDED)).outputs[0]

    reference = hf_log_softmax(hf_model, prompt + out.token_ids[:-1])[len(prompt) - 1 :]
    assert [entry.token_id for entry in out.logprobs] == out.token_ids
    for entry, row in zip(out.logprobs, reference):
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        top = row.topk(5)
        assert [token for token, _ in entry.top] == top.indices.tolist()
        assert [value for _, value in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(entry.logprob for entry in out.logprobs), abs=1e-4)


def test_logprobs_zero_reports_the_chosen_token_only(engine, prompt_40):
    out = run(engine, prompt_40, greedy(4, logprobs=0)).outputs[0]
    assert [entry.top for entry in out.logprobs] == [[]] * 4
    assert run(engine, prompt_40, greedy(4)).outputs[0].logprobs is None


def test_echo_prompt_logprobs_equal_log_softmax_at_each_prompt_position(engine, hf_model, tiny_model_dir):
    prompt = encode(tiny_model_dir, PROMPTS[2])
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=3)  # echo with logprobs=3

    result = run(engine, prompt, params)

    reference = hf_log_softmax(hf_model, prompt)
    assert result.prompt_logprobs[0] is None  # the first token has no prefix
    assert [entry.token_id for entry in result.prompt_logprobs[1:]] == prompt[1:]
    for position, entry in enumerate(result.prompt_logprobs[1:]):
        row = reference[position]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-4)
        assert [token for token, _ in entry.top] == row.topk(3).indices.tolist()
        assert [value for _, value in entry.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert len(result.outputs[0].logprobs[0].top) == 3


# --- JSON output ------------------------------------------------------------------------------------

NAME = {"type": "string", "maxLength": 10}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {"tag": NAME},
                                                         "required": ["tag"]}}, "required": ["user"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
              "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "number": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1}},
               "required": ["x"]},
    "objects": {"type": "array", "items": {"type": "object", "properties": {"k": NAME, "n": {"type": "null"}},
                                           "required": ["k", "n"]}, "maxItems": 2},
}


def json_schema_format(name: str) -> ResponseFormat:
    return parse_response_format({"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}})


def test_json_schema_outputs_validate_while_sharing_a_batch_with_free_requests(engine, tiny_model_dir):
    prompt = encode(tiny_model_dir, "Answer in JSON:")
    free_prompts = [encode(tiny_model_dir, p) for p in PROMPTS]
    free_alone = [tokens_of(engine, p, greedy(16)) for p in free_prompts]

    constrained = {
        (name, seed): engine.submit(prompt, SamplingParams(max_tokens=200, temperature=1.0, seed=seed,
                                                           structured_output=json_schema_format(name)))
        for name in SCHEMAS for seed in (0, 1)
    }
    constrained[("flat", "n=2")] = engine.submit(
        prompt, SamplingParams(n=2, max_tokens=200, temperature=0.0, structured_output=json_schema_format("flat")))
    lorax_shape = {"type": "json_object", "schema": SCHEMAS["enum"]}
    lorax_format = parse_response_format(lorax_shape)
    constrained[("enum", "lorax")] = engine.submit(prompt, greedy(200, structured_output=lorax_format))
    free = [engine.submit(p, greedy(16)) for p in free_prompts]  # all of these share steps

    for (name, _), stream in constrained.items():
        for output in stream.result().outputs:
            assert output.finish_reason == "stop", (name, output.text)
            jsonschema.validate(json.loads(output.text), SCHEMAS[name])
    assert [s.result().outputs[0].token_ids for s in free] == free_alone
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def test_ignore_eos_with_a_json_response_format_is_a_400(engine, prompt_40):
    with pytest.raises(InvalidRequestError) as error:
        engine.submit(prompt_40, greedy(8, ignore_eos=True, structured_output=json_schema_format("flat")))
    assert error.value.param == "ignore_eos"
    assert parse_response_format({"type": "text"}) is None


# --- sampler parameters -----------------------------------------------------------------------------


def test_logit_bias_of_100_forces_a_token_and_minus_100_bans_one(engine, hf_model, prompt_40):
    paris = 7042
    assert tokens_of(engine, prompt_40, SamplingParams(max_tokens=6, logit_bias={paris: 100})) == [paris] * 6

    first = hf_log_softmax(hf_model, prompt_40)[-1]
    banned = int(first.argmax())
    runner_up = int(first.topk(2).indices[1])
    assert tokens_of(engine, prompt_40, greedy(1, logit_bias={banned: -100})) == [runner_up]


def test_repetition_penalty_matches_hf_generate(engine, hf_model, prompt_40):
    plain = tokens_of(engine, prompt_40, greedy(16, ignore_eos=True))
    penalised = tokens_of(engine, prompt_40, greedy(16, ignore_eos=True, repetition_penalty=2.0))
    with torch.no_grad():
        reference = hf_model.generate(torch.tensor([prompt_40]), max_new_tokens=16, min_new_tokens=16,
                                      do_sample=False, repetition_penalty=2.0, pad_token_id=2)[0, 40:].tolist()
    assert penalised == reference
    assert penalised != plain


@torch.no_grad()
def greedy_with_output_penalties(hf_model, prompt: list[int], max_tokens: int, frequency: float, presence: float):
    """Reference: argmax of logits - count * frequency - (count > 0) * presence over generated tokens."""
    tokens = list(prompt)
    counts = torch.zeros(hf_model.config.vocab_size)
    for _ in range(max_tokens):
        logits = hf_model(torch.tensor([tokens])).logits[0, -1].float()
        logits[2] = float("-inf")  # ignore_eos
        token = int((logits - counts * frequency - (counts > 0).float() * presence).argmax())
        counts[token] += 1
        tokens.append(token)
    return tokens[len(prompt):]


def test_frequency_and_presence_penalties_match_a_plain_reference(engine, hf_model, prompt_40):
    params = greedy(12, ignore_eos=True, frequency_penalty=0.05, presence_penalty=0.1)
    expected = greedy_with_output_penalties(hf_model, prompt_40, 12, frequency=0.05, presence=0.1)
    assert tokens_of(engine, prompt_40, params) == expected
    assert expected != tokens_of(engine, prompt_40, greedy(12, ignore_eos=True))


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}])
def test_truncating_to_one_candidate_samples_the_greedy_token(engine, prompt_40, truncation):
    expected = tokens_of(engine, prompt_40, greedy(8, ignore_eos=True))
    assert tokens_of(engine, prompt_40, SamplingParams(max_tokens=8, ignore_eos=True, **truncation)) == expected


def test_seeded_request_with_every_sampler_parameter_is_identical_alone_and_in_a_mixed_batch(
    engine, tiny_model_dir, prompt_40
):
    params = SamplingParams(max_tokens=20, seed=77, temperature=0.8, top_p=0.95, top_k=200, min_p=0.05,
                            presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                            logit_bias={7042: 3.0}, ignore_eos=True)
    alone = tokens_of(engine, prompt_40, params)

    before = [engine.submit(encode(tiny_model_dir, p), SamplingParams(max_tokens=20, temperature=1.2)) for p in PROMPTS[:3]]
    mixed = engine.submit(prompt_40, params)
    after = [engine.submit(encode(tiny_model_dir, p), greedy(6, repetition_penalty=1.5)) for p in PROMPTS[:2]]
    after.append(engine.submit(prompt_40, SamplingParams(n=2, max_tokens=10, seed=78, top_k=5)))

    assert mixed.result().outputs[0].token_ids == alone
    for stream in before + after:
        stream.result()


# --- stop strings and special tokens ----------------------------------------------------------------


def spanning_stop_string(tokenizer, token_ids: list[int], text: str) -> tuple[str, int]:
    """A 4-character stop string made of the last 2 characters of token k-1 and the first 2 of token k
    (its first occurrence in `text`), and k."""
    for k in range(2, len(token_ids)):
        before = tokenizer.decode(token_ids[: k - 1])
        boundary = len(tokenizer.decode(token_ids[:k]))
        after = len(tokenizer.decode(token_ids[: k + 1]))
        if boundary - len(before) >= 2 and after - boundary >= 2:
            stop = text[boundary - 2 : boundary + 2]
            if text.find(stop) == boundary - 2:
                return stop, k
    raise AssertionError("no token boundary with 2 characters on each side")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_two_tokens_ends_generation(engine, prompt_40, include):
    params = dict(max_tokens=24, seed=21, **SEEDED)
    free = run(engine, prompt_40, SamplingParams(**params)).outputs[0]
    assert free.text == engine.tokenizer.decode(free.token_ids)
    stop, k = spanning_stop_string(engine.tokenizer, free.token_ids, free.text)

    out = run(engine, prompt_40, SamplingParams(stop=[stop], include_stop_str_in_output=include, **params)).outputs[0]

    cut = free.text.index(stop) + (len(stop) if include else 0)
    assert (out.text, out.finish_reason) == (free.text[:cut], "stop")
    assert out.token_ids == free.token_ids[: k + 1]  # the token that completes the stop string is the last


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, ""),
        ({"skip_special_tokens": False}, "<|im_start|> <|im_start|> <|im_start|>"),
        ({"skip_special_tokens": False, "spaces_between_special_tokens": False}, "<|im_start|>" * 3),
    ],
)
def test_special_tokens_appear_in_text_only_without_skip_special_tokens(engine, prompt_40, options, expected):
    out = run(engine, prompt_40, greedy(3, logit_bias={IM_START: 100}, **options)).outputs[0]
    assert out.token_ids == [IM_START] * 3
    assert out.text == expected

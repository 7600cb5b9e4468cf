"""Guided decoding beyond JSON: guided_choice, guided_regex, guided_grammar (EBNF), guided_json and
`structured_outputs`, parsed once per request and enforced by the engine's batched grammar masks.

The model is the tiny random Llama sampled at temperature 1: whatever it prefers, the output matches.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.structured import (
    ChoiceConstraint,
    GrammarConstraint,
    RegexConstraint,
    ResponseFormat,
    parse_structured_output,
)
from tests.engine_support import encode

CHOICES = ["positive", "negative", "neutral", "it's \"complicated\"\n"]
REGEXES = [r"[a-z]{2}-[0-9]{3}", r"(yes|no), because [a-z ]{1,12}\.", r"\d{1,3}(\.\d{1,2})?"]
ARITHMETIC = 'root ::= term (" + " term){0,3}\nterm ::= [1-9] [0-9]{0,2}'
ARITHMETIC_REGEX = r"[1-9][0-9]{0,2}( \+ [1-9][0-9]{0,2}){0,3}"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
SEEDS = range(6)


def run(engine, prompt: list[int], constraint, seed: int) -> str:
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=seed, structured_output=constraint)
    output = engine.submit(prompt, params).result().outputs[0]
    assert output.finish_reason == "stop", output.text
    return output.text


@pytest.fixture(scope="module")
def prompt(tiny_model_dir) -> list[int]:
    return encode(tiny_model_dir, "Classify the review:")


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [
        ({}, None),
        ({"guided_choice": ["a", "b"]}, ChoiceConstraint(("a", "b"))),
        ({"guided_regex": "[0-9]+"}, RegexConstraint("[0-9]+")),
        ({"guided_grammar": ARITHMETIC}, GrammarConstraint(ARITHMETIC)),
        ({"guided_json": PERSON}, ResponseFormat("json_schema", PERSON, param="guided_json")),
        ({"guided_json": json.dumps(PERSON)}, ResponseFormat("json_schema", PERSON, param="guided_json")),
        ({"structured_outputs": {"choice": ["a"]}}, ChoiceConstraint(("a",), param="structured_outputs.choice")),
        ({"structured_outputs": {"regex": "x+"}}, RegexConstraint("x+", param="structured_outputs.regex")),
        ({"structured_outputs": {"json": PERSON}},
         ResponseFormat("json_schema", PERSON, param="structured_outputs.json")),
        ({"structured_outputs": {"json_object": True}},
         ResponseFormat("json_object", param="structured_outputs.json_object")),
        ({"structured_outputs": {"grammar": ARITHMETIC}},
         GrammarConstraint(ARITHMETIC, param="structured_outputs.grammar")),
        ({"response_format": {"type": "text"}, "guided_decoding_backend": "xgrammar"}, None),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else None,
)
def test_each_field_becomes_one_constraint(body, expected):
    assert parse_structured_output(body) == expected


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_choice": ["a", 1]}, "guided_choice", "non-empty list"),
        ({"guided_regex": ""}, "guided_regex", "non-empty string"),
        ({"guided_json": "{oops"}, "guided_json", "not valid JSON"),
        ({"guided_json": {"type": "strin"}}, "guided_json", "not a valid JSON schema"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml", "not supported"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "only one structured-output field"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "only one"),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "only xgrammar"),
    ],
)
def test_malformed_or_conflicting_fields_are_a_400_naming_the_field(body, param, message):
    with pytest.raises(InvalidRequestError, match=message) as raised:
        parse_structured_output(body)
    assert raised.value.param == param and raised.value.status == 400


@pytest.mark.parametrize(
    "body, param",
    [({"guided_regex": "(unclosed"}, "guided_regex"), ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar")],
)
def test_what_xgrammar_cannot_compile_is_a_400_at_submission(engine, prompt, body, param):
    params = SamplingParams(max_tokens=4, structured_output=parse_structured_output(body))
    with pytest.raises(InvalidRequestError, match=f"{param}: the .* is not supported") as raised:
        engine.submit(prompt, params)
    assert raised.value.param == param


# --- the output always matches -------------------------------------------------------------------


def test_guided_choice_output_is_always_one_of_the_choices(engine, prompt):
    constraint = parse_structured_output({"guided_choice": CHOICES})
    outputs = {run(engine, prompt, constraint, seed) for seed in SEEDS}
    assert outputs <= set(CHOICES)


@pytest.mark.parametrize("pattern", REGEXES)
def test_guided_regex_output_always_matches_the_whole_pattern(engine, prompt, pattern):
    constraint = parse_structured_output({"guided_regex": pattern})
    for seed in SEEDS:
        text = run(engine, prompt, constraint, seed)
        assert re.fullmatch(pattern, text), (pattern, text)


def test_guided_grammar_output_is_a_sentence_of_the_ebnf(engine, prompt):
    constraint = parse_structured_output({"structured_outputs": {"grammar": ARITHMETIC}})
    for seed in SEEDS:
        text = run(engine, prompt, constraint, seed)
        assert re.fullmatch(ARITHMETIC_REGEX, text), text


def test_guided_json_output_validates(engine, prompt):
    constraint = parse_structured_output({"guided_json": PERSON})
    for seed in SEEDS:
        jsonschema.validate(json.loads(run(engine, prompt, constraint, seed)), PERSON)


def test_constrained_and_free_requests_share_batches_and_free_every_block(engine, prompt):
    constraints = [parse_structured_output({"guided_choice": CHOICES}), parse_structured_output({"guided_regex": REGEXES[0]})]
    streams = [engine.submit(prompt, SamplingParams(max_tokens=32, temperature=1.0, seed=s,
                                                    structured_output=constraints[s % 2])) for s in SEEDS]
    free = [engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0.0)) for _ in range(3)]
    texts = [s.result().outputs[0].text for s in streams]
    assert all(t in CHOICES for t in texts[0::2]) and all(re.fullmatch(REGEXES[0], t) for t in texts[1::2])
    assert len({tuple(f.result().outputs[0].token_ids) for f in free}) == 1
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks

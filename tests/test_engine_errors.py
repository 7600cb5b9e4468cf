"""Bad input fails its own request with a clear error; everyone else is served; nothing leaks."""

from __future__ import annotations

import json
import os

import pytest

from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import (
    AdapterNotFoundError,
    AdapterValidationError,
    ContextLengthError,
    InvalidRequestError,
    LoraxError,
)
from tests.engine_support import PROMPTS, adapter, encode, greedy, make_engine
from tests.helpers import build_peft_adapter, build_tiny_model


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, tiny_model_dir, adapter_root):
    """Adapters that exist under the root but cannot be served, one per failure mode."""
    other_base = build_tiny_model(tmp_path_factory.mktemp("other-base"), hidden_size=32, intermediate_size=64)
    made = {
        "other_base": build_peft_adapter(other_base, adapter_root / "bad-other-base", rank=4),
        "rank_too_high": build_peft_adapter(tiny_model_dir, adapter_root / "bad-rank", rank=32),
        "corrupt": build_peft_adapter(tiny_model_dir, adapter_root / "bad-corrupt", rank=4),
        "missing_weights": build_peft_adapter(tiny_model_dir, adapter_root / "bad-missing", rank=4),
    }
    weights = made["corrupt"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    os.remove(made["missing_weights"] / "adapter_model.safetensors")
    return made


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_root, tiny_adapters):
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root], max_lora_rank=16)
    yield engine
    engine.shutdown()


def assert_nothing_leaked(engine):
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks
    assert all(r == 0 for r in engine.core.slots.refs)


def run(engine, prompt, params, adapter_request=None):
    return engine.submit(prompt, params, adapter_request).result()


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        ("other_base", AdapterValidationError, "different base model"),
        ("rank_too_high", AdapterValidationError, "rank"),
        ("corrupt", AdapterValidationError, "corrupt"),
        ("missing_weights", AdapterValidationError, "adapter_model"),
    ],
)
def test_unusable_adapter_fails_only_its_own_request(engine, tiny_model_dir, bad_adapters, case, error, words):
    good = [engine.submit(encode(tiny_model_dir, p), greedy(10)) for p in PROMPTS[:3]]
    with pytest.raises(error) as raised:
        run(engine, encode(tiny_model_dir, PROMPTS[3]), greedy(10), adapter(str(bad_adapters[case])))
    assert words in raised.value.message.lower()
    assert all(s.result().finished for s in good)
    assert_nothing_leaked(engine)


def test_unknown_adapter_is_a_404(engine, tiny_model_dir, adapter_root):
    with pytest.raises(AdapterNotFoundError):
        engine.submit(encode(tiny_model_dir, "hi"), greedy(), adapter(str(adapter_root / "no-such-adapter")))


def test_local_path_outside_the_adapter_roots_is_refused_without_reading_it(engine, tiny_model_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(LoraxError) as raised:
        engine.submit(encode(tiny_model_dir, "hi"), greedy(), adapter(str(outside)))
    assert "root" in raised.value.message.lower()


def test_prompt_longer_than_the_context_is_a_clear_400(engine):
    with pytest.raises(ContextLengthError) as raised:
        engine.submit(list(range(10, 300)), greedy(5))
    assert "maximum context length is 256" in raised.value.message
    with pytest.raises(ContextLengthError):
        engine.submit(list(range(10, 200)), greedy(100))


@pytest.mark.parametrize(
    ("params", "param"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(n=2, best_of=1), "best_of"),
        (dict(logit_bias={10**6: 1.0}), "logit_bias"),
    ],
)
def test_out_of_range_parameters_name_the_parameter(engine, params, param):
    with pytest.raises(InvalidRequestError) as raised:
        engine.submit([1, 2, 3], SamplingParams(**params))
    assert raised.value.param == param


def test_engine_keeps_serving_after_errors(engine, tiny_model_dir):
    out = run(engine, encode(tiny_model_dir, PROMPTS[0]), greedy(5, ignore_eos=True))
    assert out.finished and len(out.outputs[0].token_ids) == 5
    assert_nothing_leaked(engine)


def test_sampling_never_picks_the_padded_vocabulary_rows(tmp_path):
    """A model whose output layer is wider than its tokenizer (rows rounded up for GPU tiles): the
    padded rows are made to win every argmax, yet every sampled token is a real token."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.engine_support import load_hf

    vocab, padded = 49152, 49152 + 64
    folder = build_tiny_model(tmp_path / "padded", vocab_size=padded, tie_word_embeddings=False)
    model = LlamaForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.lm_head.weight[vocab:, :] = 50.0  # a huge logit whenever sum(h) > 0 ...
        model.lm_head.weight[vocab:vocab + 32, :] *= -1  # ... or < 0
    model.save_pretrained(folder)
    prompt = encode(folder, PROMPTS[0])
    with torch.no_grad():  # the unpatched argmax would be a padded row
        assert load_hf(folder)(torch.tensor([prompt])).logits[0, -1].argmax().item() >= vocab

    engine = make_engine(folder, device="cpu")
    try:
        out = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)).result()
        sampled = engine.submit(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)).result()
    finally:
        engine.shutdown()
    tokens = out.outputs[0].token_ids + sampled.outputs[0].token_ids
    assert len(tokens) == 16 and all(0 <= t < vocab for t in tokens)
    with pytest.raises(InvalidRequestError, match=r"\[0, 49152\)"):
        engine.submit([vocab + 1], greedy())


# --- one request's failure inside a step fails only that request ---------------------------------------

POISON = 7777


def test_an_exception_in_a_step_fails_only_the_request_it_belongs_to(tiny_model_dir, monkeypatch):
    """The issue's case: one request's bad data made the step raise and every request of the batch
    failed with "internal error during generation". Now the step is retried request by request."""
    from lorax_mlflow.errors import EngineStepError

    prompts = [encode(tiny_model_dir, p) for p in PROMPTS[:4]]
    engine = make_engine(tiny_model_dir, device="cpu")
    try:
        expected = [engine.submit(p, greedy(10, ignore_eos=True)).result().outputs[0].token_ids for p in prompts]
        core = engine.core
        execute = core.runner.execute

        def execute_that_chokes_on_the_poison(scheduled, ranks, *args, **kwargs):
            if any(POISON in item.seq.prompt_token_ids for item in scheduled):
                raise IndexError("index out of range in self")  # what a bad token id used to raise
            return execute(scheduled, ranks, *args, **kwargs)

        monkeypatch.setattr(core.runner, "execute", execute_that_chokes_on_the_poison)
        streams = [engine.submit(p, greedy(10, ignore_eos=True)) for p in prompts[:2]]
        poisoned = engine.submit([1, POISON, 3], greedy(10, ignore_eos=True))
        streams += [engine.submit(p, greedy(10, ignore_eos=True)) for p in prompts[2:]]

        assert [s.result().outputs[0].token_ids for s in streams] == expected
        with pytest.raises(EngineStepError) as caught:
            poisoned.result()
        assert caught.value.status == 500 and "IndexError" in caught.value.message
        assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    finally:
        engine.shutdown()


def test_an_error_appending_one_requests_token_fails_only_that_request(tiny_model_dir, monkeypatch):
    """A grammar that rejects its token (or any error accepting it) fails its own request."""
    from lorax_mlflow.errors import EngineStepError

    prompts = [encode(tiny_model_dir, p) for p in PROMPTS[:3]]
    engine = make_engine(tiny_model_dir, device="cpu")
    try:
        expected = [engine.submit(p, greedy(8, ignore_eos=True)).result().outputs[0].token_ids for p in prompts]
        core = engine.core
        append = core._append_token

        def append_rejecting_the_poisoned(seq, *args, **kwargs):
            if POISON in seq.prompt_token_ids:
                raise ValueError("TokenRejectedError: the grammar does not accept this token")
            return append(seq, *args, **kwargs)

        monkeypatch.setattr(core, "_append_token", append_rejecting_the_poisoned)
        poisoned = engine.submit([1, POISON, 3], greedy(8, ignore_eos=True))
        streams = [engine.submit(p, greedy(8, ignore_eos=True)) for p in prompts]
        assert [s.result().outputs[0].token_ids for s in streams] == expected
        with pytest.raises(EngineStepError, match="TokenRejectedError"):
            poisoned.result()
        assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    finally:
        engine.shutdown()

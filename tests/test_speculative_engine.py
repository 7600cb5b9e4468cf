"""Speculative decoding through the engine: greedy output is token-for-token the non-speculative output for
every kind of request (base with prompt lookup, LoRA, Medusa, LoRA+Medusa, the default Medusa adapter) in
mixed batches and across preemption; seeded sampling stays reproducible; rejected drafts leave no KV
block behind; speculation stops above the batch-size limit."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lorax_mlflow.engine.sampling_params import SamplingParams
from tests.engine_support import PROMPTS, adapter, encode, greedy, make_engine
from tests.helpers import build_medusa_adapter

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def medusa(tiny_model_dir, tiny_adapters, adapter_root) -> dict[str, Path]:
    """Identity heads (zero residual blocks: each repeats the model's next-token guess, which the tiny
    model's loops often accept) and random ones, alone and beside LoRA a."""
    identity = build_medusa_adapter(tiny_model_dir, adapter_root / "medusa-identity", num_heads=3)
    from safetensors.torch import load_file, save_file

    path = identity / "medusa_lm_head.safetensors"
    save_file({key: torch.zeros_like(value) for key, value in load_file(path).items()}, path)
    return {
        "identity": identity,
        "random": build_medusa_adapter(tiny_model_dir, adapter_root / "medusa-random", num_heads=4, seed=3),
        "lora+medusa": build_medusa_adapter(tiny_model_dir, adapter_root / "lora-a-medusa", num_heads=2, seed=4,
                                             lora_from=tiny_adapters["a"], layout="shared"),
    }


def requests(tiny_adapters, medusa) -> list[tuple[str, str]]:
    """(prompt, adapter id) pairs covering every kind of request, several per kind."""
    ids = ["", str(tiny_adapters["a"]), str(tiny_adapters["b"]), str(medusa["identity"]), str(medusa["random"]),
           str(medusa["lora+medusa"])]
    return [(prompt, adapter_id) for adapter_id in ids for prompt in PROMPTS[:3]]


def run_all(engine, model_dir, pairs, params=None) -> list[list[int]]:
    streams = [engine.submit(encode(model_dir, prompt), params or greedy(MAX_TOKENS), adapter(adapter_id))
               for prompt, adapter_id in pairs]
    return [stream.result().outputs[0].token_ids for stream in streams]


def assert_nothing_leaked(engine) -> None:
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks
    assert all(refs == 0 for refs in engine.core.slots.refs)


def run_speculating(model_dir, adapter_root, pairs, **config):
    """`pairs` on an engine built with `config`: (greedy outputs, the speculator's counters); nothing leaks."""
    engine = make_engine(model_dir, [adapter_root], **config)
    try:
        outputs = run_all(engine, model_dir, pairs)
        assert_nothing_leaked(engine)
        return outputs, engine.core.speculator.counters
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_adapters, medusa, adapter_root) -> list[list[int]]:
    engine = make_engine(tiny_model_dir, [adapter_root])
    try:
        return run_all(engine, tiny_model_dir, requests(tiny_adapters, medusa))
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "config",
    [
        dict(speculative_tokens=3, speculative_max_batch_size=64),
        dict(speculative_tokens=2, speculative_max_batch_size=64, kv_cache_bytes=160 << 10, max_num_batched_tokens=64),  # preempts, chunks prompts
    ],
    ids=["mixed-batch", "preemption"],
)
def test_greedy_output_is_unchanged_by_speculation(config, reference, tiny_model_dir, tiny_adapters, medusa,
                                                   adapter_root, caplog):
    caplog.set_level(logging.DEBUG, logger="lorax_mlflow.engine.scheduler")
    outputs, counters = run_speculating(tiny_model_dir, adapter_root, requests(tiny_adapters, medusa), **config)

    assert outputs == reference
    assert ("preempting sequence" in caplog.text) == ("kv_cache_bytes" in config)
    proposed, accepted = sum(counters.proposed.values()), sum(counters.accepted.values())
    assert 0 < accepted < proposed  # drafts were both accepted and rolled back
    assert counters.proposed.keys() >= {"", str(medusa["identity"]), str(medusa["random"]), str(medusa["lora+medusa"])}


def test_default_speculative_adapter_drafts_for_requests_without_heads(
    reference, tiny_model_dir, tiny_adapters, medusa, adapter_root
):
    outputs, counters = run_speculating(tiny_model_dir, adapter_root, requests(tiny_adapters, medusa),
                                        speculative_adapter=str(medusa["identity"]), speculative_max_batch_size=64)

    assert outputs == reference
    assert counters.proposed[""] > 0 and counters.proposed[str(tiny_adapters["a"])] > 0  # heads, not prompt lookup
    assert counters.accepted[""] > 0


@pytest.mark.parametrize("max_batch_size", [1, 64])
def test_seeded_sampling_with_speculation_is_reproducible_alone_and_in_a_batch(tiny_model_dir, medusa, adapter_root,
                                                                              max_batch_size):
    """The engine speculates for the batch's other requests (limit 64) or switches speculation off
    (limit 1); a seeded sampled request never speculates, so its seed gives the same tokens alone and
    in the batch either way."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_k=20, seed=7)
    prompt = encode(tiny_model_dir, PROMPTS[1])
    engine = make_engine(tiny_model_dir, [adapter_root], speculative_tokens=3, speculative_max_batch_size=max_batch_size)
    try:
        alone = engine.submit(prompt, params, adapter(str(medusa["identity"]))).result().outputs[0].token_ids
        others = [engine.submit(encode(tiny_model_dir, p), SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0))
                  for p in PROMPTS]
        batched = engine.submit(prompt, params, adapter(str(medusa["identity"]))).result().outputs[0].token_ids
        for stream in others:
            stream.result()
        assert_nothing_leaked(engine)
    finally:
        engine.shutdown()
    assert alone == batched and len(alone) == MAX_TOKENS


def test_no_speculation_above_the_batch_size_limit(tiny_model_dir, adapter_root, reference, tiny_adapters, medusa):
    outputs, counters = run_speculating(tiny_model_dir, adapter_root, requests(tiny_adapters, medusa),
                                        speculative_tokens=3, speculative_max_batch_size=0)
    assert outputs == reference
    assert sum(counters.proposed.values()) == 0

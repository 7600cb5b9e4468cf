"""Chunked prefill: a long prompt is split over steps that never exceed the token budget, decodes
keep running beside it, and the tokens (and prompt logprobs) are exactly those of an unchunked run."""

from __future__ import annotations

import threading
import time

import pytest

from lorax_mlflow.engine.prefill_budget import PrefillBudget
from lorax_mlflow.engine.sampling_params import SamplingParams
from tests.engine_support import PROMPTS, adapter, encode, greedy, hf_greedy, make_engine

BUDGET = 16
CHUNK = 6


@pytest.fixture(scope="module")
def chunked(tiny_model_dir, adapter_root, tiny_adapters):
    """Steps of at most 16 tokens, at most 6 of them prefill while anything decodes."""
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root], max_num_batched_tokens=BUDGET,
                         prefill_chunk_tokens=CHUNK)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def unchunked(tiny_model_dir, adapter_root, tiny_adapters):
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root])
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def long_prompts(tiny_model_dir) -> list[list[int]]:
    """Prompts of 20 to 70 tokens: all longer than one step's budget."""
    text = " ".join(PROMPTS)
    return [(encode(tiny_model_dir, text) * 4)[i : i + length] for i, length in enumerate([20, 33, 47, 70])]


def record_steps(engine, monkeypatch) -> list[tuple[int, int, int]]:
    """(decode tokens, prefill tokens, tokens fed) of every step the engine runs from now on."""
    steps: list[tuple[int, int, int]] = []
    schedule = engine.core.scheduler.schedule

    def recording_schedule():
        out = schedule()
        if not out.is_empty:
            steps.append((out.num_decode_tokens, out.num_prefill_tokens, sum(i.num_new_tokens for i in out.scheduled)))
        return out

    monkeypatch.setattr(engine.core.scheduler, "schedule", recording_schedule)
    return steps


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_and_equals_hf(chunked, hf_model, long_prompts,
                                                                             monkeypatch):
    steps = record_steps(chunked, monkeypatch)
    prompt = long_prompts[3]
    tokens = chunked.submit(prompt, greedy(12)).result().outputs[0].token_ids
    assert tokens == hf_greedy(hf_model, prompt, 12)
    prefill_steps = [s for s in steps if s[1]]
    assert [s[1] for s in prefill_steps] == [16, 16, 16, 16, 6]  # 70 tokens, alone: whole budgets
    assert chunked.core.block_manager.num_free_blocks == chunked.core.block_manager.num_blocks


def test_mixed_adapter_batch_with_staggered_long_prompts_equals_unchunked(chunked, unchunked, long_prompts,
                                                                          tiny_adapters, monkeypatch):
    names = ["a", "b", None, "c", "a", None, "b", "c"]
    cases = [(long_prompts[i % 4], names[i]) for i in range(len(names))]
    params = greedy(10, ignore_eos=True)

    def submit(engine, prompt, name):
        return engine.submit(prompt, params, adapter(str(tiny_adapters[name])) if name else None)

    expected = [submit(unchunked, p, n).result().outputs[0].token_ids for p, n in cases]
    steps = record_steps(chunked, monkeypatch)
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        time.sleep(0.03 * i)  # later prompts arrive while earlier ones decode
        results[i] = submit(chunked, *cases[i]).result().outputs[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(cases))] == expected
    assert all(fed <= BUDGET for _, _, fed in steps), "a step never exceeds max_num_batched_tokens"
    assert all(prefill <= CHUNK for decodes, prefill, _ in steps if decodes), "chunks beside decodes stay small"
    assert any(decodes and prefill for decodes, prefill, _ in steps), "decodes ran beside a prefill chunk"
    assert all(r == 0 for r in chunked.core.slots.refs)
    assert chunked.core.block_manager.num_free_blocks == chunked.core.block_manager.num_blocks


def test_prompt_logprobs_over_chunks_equal_unchunked(chunked, unchunked, long_prompts, tiny_adapters):
    prompt = long_prompts[2]
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2, logprobs=1)
    runs = []
    for engine in (chunked, unchunked):
        decoding = engine.submit(long_prompts[1], greedy(30, ignore_eos=True))  # keeps the chunks small
        runs.append(engine.submit(prompt, params, adapter(str(tiny_adapters["b"]))).result())
        decoding.result()
    chunked_run, reference = runs
    assert len(chunked_run.prompt_logprobs) == len(prompt) and chunked_run.prompt_logprobs[0] is None
    for got, want in zip(chunked_run.prompt_logprobs[1:], reference.prompt_logprobs[1:]):
        assert got.token_id == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
    assert chunked_run.outputs[0].token_ids == reference.outputs[0].token_ids


def test_n_siblings_sample_once_the_chunked_prompt_is_complete(chunked, hf_model, long_prompts):
    prompt = long_prompts[3]
    decoding = chunked.submit(long_prompts[0], greedy(40, ignore_eos=True))
    out = chunked.submit(prompt, greedy(8, n=3)).result()
    decoding.result()
    assert [o.token_ids for o in out.outputs] == [hf_greedy(hf_model, prompt, 8)] * 3
    assert chunked.core.block_manager.num_free_blocks == chunked.core.block_manager.num_blocks


def test_preemption_during_chunked_prefill_recomputes_to_the_same_tokens(tiny_model_dir, long_prompts):
    # 12 blocks of 16 tokens for 4 requests of 60-110 tokens: chunked prefills get preempted.
    engine = make_engine(tiny_model_dir, kv_cache_bytes=12 * 16 * 2 * 2 * 2 * 16 * 4, max_num_batched_tokens=BUDGET,
                         prefill_chunk_tokens=CHUNK)
    reference = make_engine(tiny_model_dir)
    try:
        params = SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True, seed=9)
        expected = [reference.submit(p, params).result().outputs[0].token_ids for p in long_prompts]
        streams = [engine.submit(p, params) for p in long_prompts]
        assert [s.result().outputs[0].token_ids for s in streams] == expected
        assert engine.core.block_manager.num_free_blocks == 12
    finally:
        engine.shutdown()
        reference.shutdown()


def test_learned_chunk_makes_a_step_cost_about_ratio_decode_steps():
    budget = PrefillBudget(2048, fixed_chunk=None, chunk_cost_ratio=2.0)
    assert budget.tokens(num_decodes=0) == 2048  # nothing decodes: the whole budget
    assert budget.tokens(num_decodes=16) == 256  # not measured yet
    for _ in range(20):
        budget.observe(num_decodes=16, num_prefill_tokens=0, seconds=0.1)  # decode step: 100 ms
        budget.observe(num_decodes=16, num_prefill_tokens=100, seconds=0.6)  # 100 tokens add 500 ms
    assert budget.tokens(num_decodes=16) == pytest.approx(40, abs=1)  # 2 x 100 ms at 5 ms a token
    assert PrefillBudget(2048, fixed_chunk=64, chunk_cost_ratio=2.0).tokens(num_decodes=3) == 64
    assert PrefillBudget(16, fixed_chunk=None, chunk_cost_ratio=2.0).tokens(num_decodes=3) == 16


def test_step_cost_model_learns_decode_cost_per_sequence_from_mixed_steps():
    """A decode step of 16 sequences costs more than one of 1; while a long prompt keeps every step
    mixed, the model still learns it from those mixed steps, so the chunk follows the batch."""
    from lorax_mlflow.engine.step_cost import StepCostModel

    def seconds(decodes: int, prefill: int) -> float:  # 80 ms fixed, 8 ms a decode, 3 ms a prefill token
        return 0.080 + 0.008 * decodes + 0.003 * prefill

    model = StepCostModel()
    assert not model.ready
    for decodes, prefill in [(0, 40), (0, 1500), (1, 32), (4, 32), (8, 64), (16, 90), (16, 60), (12, 0), (16, 120)] * 3:
        model.observe(decodes, prefill, seconds(decodes, prefill))
    assert model.ready
    assert model.decode_step_s(1) == pytest.approx(0.088, rel=0.02)
    assert model.decode_step_s(16) == pytest.approx(0.208, rel=0.02)
    assert model.prefill_token_s == pytest.approx(0.003, rel=0.02)

    budget = PrefillBudget(2048, fixed_chunk=None, chunk_cost_ratio=2.0)
    budget.cost = model
    assert budget.tokens(num_decodes=16) == pytest.approx(2 * 0.208 / 0.003, abs=2)
    assert budget.tokens(num_decodes=1) == pytest.approx(2 * 0.088 / 0.003, abs=2)

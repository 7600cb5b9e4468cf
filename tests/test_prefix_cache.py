"""Prefix caching through the engine: a conversation resent turn after turn pays only for its new
tokens, and the reused K/V always belongs to the same weights: outputs equal those of an engine
without the cache, for the base model and adapters, in mixed batches, with n > 1 and preemption."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from lorax_mlflow.engine.sampling_params import SamplingParams
from tests.engine_support import PROMPTS, adapter, encode, greedy, hf_greedy, make_engine
from tests.helpers import build_peft_adapter
from tests.test_adapters_engine import peft_greedy

MAX_TOKENS = 8
SYSTEM = "You are a careful assistant. Answer briefly and cite the question you were asked. " * 3


@pytest.fixture(scope="module")
def cached(tiny_model_dir, adapter_root):
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root])
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def uncached(tiny_model_dir, adapter_root):
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root], enable_prefix_caching=False)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def chunked_cached(tiny_model_dir, adapter_root):
    """Steps of at most 16 tokens, 6 of them prefill while anything decodes: prompts span many steps."""
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root], max_num_batched_tokens=16,
                         prefill_chunk_tokens=6)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def system(tiny_model_dir) -> list[int]:
    return encode(tiny_model_dir, SYSTEM)


def submit_all(engine, jobs):
    """Submit (prompt, params, adapter folder or None) jobs together; their final outputs in order."""
    streams = [engine.submit(p, params, adapter(str(a)) if a else None) for p, params, a in jobs]
    return [s.result() for s in streams]


def record_tables(engine, monkeypatch) -> list[tuple[int, int, list[int]]]:
    """(prompt tokens fed, block table) of every prefill chunk of every step."""
    seen: list[tuple[int, list[int]]] = []
    execute = engine.core.runner.execute

    def recording(scheduled, *args):
        seen.extend((i.num_new_tokens, list(i.seq.block_table)) for i in scheduled
                    if i.num_new_tokens and i.seq.num_cached_tokens < i.seq.num_prompt_tokens)
        return execute(scheduled, *args)

    monkeypatch.setattr(engine.core.runner, "execute", recording)
    return seen


def assert_no_leaks(engine) -> None:
    manager = engine.core.block_manager
    deadline = time.time() + 5
    while manager.num_free_blocks != manager.num_blocks and time.time() < deadline:
        time.sleep(0.01)
    assert manager.num_free_blocks == manager.num_blocks
    assert all(refs == 0 for refs in manager.ref_counts)
    assert all(refs == 0 for refs in engine.core.slots.refs)


@pytest.mark.parametrize("engine_name", ["cached", "chunked_cached"])
def test_a_multi_turn_conversation_reuses_its_history_and_generates_what_an_uncached_engine_does(
    engine_name, uncached, tiny_model_dir, tiny_adapters, system, request
):
    cached = request.getfixturevalue(engine_name)
    # Four conversations (base and three adapters) resent turn after turn, in one mixed batch, one with n=2.
    owners = [None, tiny_adapters["a"], tiny_adapters["b"], tiny_adapters["c"]]
    histories = [system + encode(tiny_model_dir, f" Question {i}: {PROMPTS[i]}") for i in range(4)]
    for turn in range(3):
        jobs = [(h, greedy(MAX_TOKENS, n=2 if i == 1 else 1, ignore_eos=True), a)
                for i, (h, a) in enumerate(zip(histories, owners))]
        with_cache, without = submit_all(cached, jobs), submit_all(uncached, jobs)
        for got, want in zip(with_cache, without):
            assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]
            assert want.num_cached_tokens == 0
            if turn > 0:  # the previous turn's prompt and answer are cached, in whole blocks
                assert got.num_cached_tokens >= len(histories[0]) // 2
        histories = [h + r.outputs[0].token_ids + encode(tiny_model_dir, " And then?") for h, r in zip(histories, with_cache)]
    assert_no_leaks(cached)


def test_the_same_history_under_two_adapters_never_shares_a_block_but_two_names_for_one_adapter_do(
    cached, tiny_model_dir, tiny_adapters, adapter_root, system, monkeypatch
):
    copy_of_a = adapter_root / "a-under-another-name"
    if not copy_of_a.exists():
        shutil.copytree(tiny_adapters["a"], copy_of_a)
    prompt = system + encode(tiny_model_dir, " Which adapter am I?")
    full_blocks = (len(prompt) - 1) // cached.core.block_manager.block_size
    tables = record_tables(cached, monkeypatch)

    results = {}
    for name, folder in [("a", tiny_adapters["a"]), ("b", tiny_adapters["b"]), ("base", None), ("copy", copy_of_a)]:
        start = len(tables)
        results[name] = submit_all(cached, [(prompt, greedy(MAX_TOKENS), folder)])[0]
        results[name + "-table"] = tables[start][1]  # the prefill step's block table

    a, b, base, copy = (set(results[f"{n}-table"][:full_blocks]) for n in ("a", "b", "base", "copy"))
    assert not a & b and not base & (a | b)
    assert results["b"].outputs[0].token_ids == peft_greedy_n(tiny_model_dir, tiny_adapters["b"], prompt)
    assert results["copy"].num_cached_tokens == full_blocks * cached.core.block_manager.block_size
    assert copy == a
    assert results["copy"].outputs[0].token_ids == results["a"].outputs[0].token_ids


def peft_greedy_n(model_dir, adapter_dir, prompt):
    from peft import PeftModel

    from tests.engine_support import load_hf

    model = load_hf(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return hf_greedy(model, prompt, MAX_TOKENS)


def test_an_adapter_reloaded_with_new_weights_under_the_same_name_gets_no_hit(
    tiny_model_dir, tiny_adapters, adapter_root, system
):
    folder = build_peft_adapter(tiny_model_dir, adapter_root / "retrained", rank=4, alpha=8, seed=31)
    prompt = system + encode(tiny_model_dir, " Has my adapter changed?")
    # One device slot and a tiny host budget: switching adapters evicts "retrained" from both tiers.
    engine = make_engine(tiny_model_dir, adapter_roots=[adapter_root], max_loras=1, host_cache_bytes=1)
    try:
        def run(folder_):
            return submit_all(engine, [(prompt, greedy(MAX_TOKENS), folder_)])[0]

        run(folder)
        run(tiny_adapters["b"])
        same_weights_reloaded = run(folder)
        assert same_weights_reloaded.num_cached_tokens > 0  # read again from disk: same content, same K/V

        build_peft_adapter(tiny_model_dir, folder, rank=4, alpha=8, seed=32)  # new weights, same name
        run(tiny_adapters["b"])
        retrained = run(folder)
        assert engine.adapters.adapter_stats()[str(folder)].loads == 3
        assert retrained.num_cached_tokens == 0
        assert retrained.outputs[0].token_ids == peft_greedy_n(tiny_model_dir, folder, prompt)
        assert_no_leaks(engine)
    finally:
        engine.shutdown()


def test_a_runtime_name_pointed_at_new_weights_gets_no_hit(cached, tiny_model_dir, tiny_adapters):
    prompt = encode(tiny_model_dir, " Who answers under this name, in a prompt no other test sends?" * 3)

    def run():
        return cached.submit(prompt, greedy(MAX_TOKENS), adapter("support-bot")).result()

    cached.adapters.add_name("support-bot", str(tiny_adapters["a"]))
    run()
    cached.adapters.remove_name("support-bot")
    cached.adapters.add_name("support-bot", str(tiny_adapters["b"]))
    swapped = run()
    assert swapped.num_cached_tokens == 0
    assert swapped.outputs[0].token_ids == peft_greedy_n(tiny_model_dir, tiny_adapters["b"], prompt)
    cached.adapters.remove_name("support-bot")


def test_adapter_identity_is_its_content_and_a_merge_is_keyed_by_its_recipe_of_digests(
    cached, tiny_model_dir, tiny_adapters, tmp_path
):
    from lorax_mlflow.adapters.merge import MergeSpec, merge_adapters
    from lorax_mlflow.adapters.peft_format import load_peft_adapter

    def load(folder, name, **kw):
        return load_peft_adapter(folder, name, cached.core.runner.base_modules, max_rank=16,
                                 target_modules=cached.config.target_modules, **kw)

    a, a_again = load(tiny_adapters["a"], "a"), load(tiny_adapters["a"], "other-name")
    b = load(build_peft_adapter(tiny_model_dir, tmp_path / "b", rank=4, alpha=4, seed=41), "b")
    assert a.digest == a_again.digest != b.digest
    alpha_changed = build_peft_adapter(tiny_model_dir, tmp_path / "a2", rank=4, alpha=16, seed=11)
    assert load(alpha_changed, "a").digest != a.digest  # same factors, different scaling
    spec = MergeSpec(("x", "y"), (0.5, 0.5))
    assert merge_adapters([a, b], spec).digest == merge_adapters([a_again, b], spec).digest
    assert merge_adapters([a, b], spec).digest != merge_adapters([b, a], spec).digest
    assert merge_adapters([a, b], spec).digest != merge_adapters([a, b], MergeSpec(("x", "y"), (0.5, 0.6))).digest


def test_cached_blocks_are_evicted_before_any_running_request_is_preempted(tiny_model_dir, hf_model, monkeypatch):
    # 12 blocks of 16 tokens. First fill them with cached blocks of finished requests, then run
    # five requests that need more than 12 blocks together.
    engine = make_engine(tiny_model_dir, kv_cache_bytes=12 * 16 * 2 * 2 * 2 * 16 * 4)
    try:
        manager = engine.core.block_manager
        filler = encode(tiny_model_dir, " ".join(PROMPTS) * 6)[:190]
        submit_all(engine, [(filler, greedy(1), None)])
        assert manager.num_cached_blocks == 11 and manager.num_free_blocks == 12

        evictable_at_preemption: list[int] = []
        preempt = engine.core.scheduler._preempt

        def recording_preempt(seq):
            evictable_at_preemption.append(len(manager.evictable))
            preempt(seq)

        monkeypatch.setattr(engine.core.scheduler, "_preempt", recording_preempt)
        prompts = [encode(tiny_model_dir, p) for p in PROMPTS]
        results = submit_all(engine, [(p, greedy(40, ignore_eos=True), None) for p in prompts])
        assert manager.num_evictions >= 11
        assert evictable_at_preemption and set(evictable_at_preemption) == {0}
        from tests.test_engine import hf_greedy_no_eos

        for prompt, result in zip(prompts, results):
            assert result.outputs[0].token_ids == hf_greedy_no_eos(hf_model, prompt, 40)
        assert_no_leaks(engine)
    finally:
        engine.shutdown()


def test_aborting_a_request_that_reused_a_cached_prefix_frees_every_block(cached, tiny_model_dir, system):
    prompt = system + encode(tiny_model_dir, " Tell me a long story.")
    submit_all(cached, [(prompt, greedy(2), None)])
    stream = cached.submit(prompt + [42], greedy(200, ignore_eos=True))
    first = next(iter(stream))
    assert first.num_cached_tokens > 0
    stream.abort()
    assert_no_leaks(cached)
    assert cached.core.block_manager.num_cached_blocks > 0  # its prefix stays cached for the next turn


def test_a_failed_step_leaks_nothing_and_never_serves_the_kv_it_did_not_compute(
    cached, uncached, tiny_model_dir, system, monkeypatch
):
    base_prompt = system + encode(tiny_model_dir, " First question.")
    submit_all(cached, [(base_prompt, greedy(2), None)])
    execute = cached.core.runner.execute
    calls = {"n": 0}

    def failing_once(scheduled, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return execute(scheduled, *args, **kwargs)

    monkeypatch.setattr(cached.core.runner, "execute", failing_once)
    novel = base_prompt + encode(tiny_model_dir, " A follow-up that nobody has asked before, long enough to fill blocks.")
    # The core reruns the failed step's requests one at a time; the blocks that step registered are
    # forgotten (their K/V may never have been written), so nothing can reuse them.
    first = submit_all(cached, [(novel, greedy(MAX_TOKENS), None)])[0]
    assert calls["n"] > 1
    assert_no_leaks(cached)
    again = submit_all(cached, [(novel, greedy(MAX_TOKENS), None)])[0]
    want = submit_all(uncached, [(novel, greedy(MAX_TOKENS), None)])[0]
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == want.outputs[0].token_ids
    assert_no_leaks(cached)


def test_prompt_logprobs_bypass_the_cache_and_are_all_returned(cached, uncached, tiny_model_dir, system):
    prompt = system + encode(tiny_model_dir, " Score every token of this prompt.")
    submit_all(cached, [(prompt, greedy(2), None)])
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    got = submit_all(cached, [(prompt, params, None)])[0]
    want = submit_all(uncached, [(prompt, params, None)])[0]
    assert got.num_cached_tokens == 0
    assert len(got.prompt_logprobs) == len(prompt)
    for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert g.token_id == w.token_id and g.logprob == pytest.approx(w.logprob, abs=1e-4)


@pytest.mark.parametrize("engine_name", ["cached", "chunked_cached"])
def test_sixteen_requests_sharing_a_system_prompt_prefill_it_once(engine_name, tiny_model_dir, monkeypatch, request):
    """Sent together, also with prefills chunked over many steps: the later requests share the
    system prompt's blocks instead of computing them again."""
    cached = request.getfixturevalue(engine_name)
    block = cached.core.block_manager.block_size
    system = (encode(tiny_model_dir, f"A brand new system prompt for {engine_name}, never seen before. ") * 8)[:4 * block]
    words = ["apple", "river", "mountain", "violin", "copper", "winter", "garden", "rocket",
             "silver", "forest", "castle", "ocean", "thunder", "pepper", "marble", "lantern"]
    questions = [encode(tiny_model_dir, f"{word} is the topic. What about it?") for word in words]
    assert len({q[0] for q in questions}) == 16  # the prompts part ways right after the system prompt
    tables = record_tables(cached, monkeypatch)
    results = submit_all(cached, [(system + q, greedy(2), None) for q in questions])
    prefilled = sum(fed for fed, _ in tables)
    assert prefilled == len(system) + sum(len(q) for q in questions)  # the system prompt once, in full blocks
    assert sorted(r.num_cached_tokens for r in results) == [0] + [len(system)] * 15


def test_prefix_caching_off_computes_every_prompt_in_full(uncached, tiny_model_dir, system):
    prompt = system + encode(tiny_model_dir, " Again.")
    first, second = (submit_all(uncached, [(prompt, greedy(2), None)])[0] for _ in range(2))
    assert first.num_cached_tokens == second.num_cached_tokens == 0
    assert uncached.core.block_manager.num_cached_blocks == 0


def test_concurrent_turns_of_many_conversations_stay_correct(cached, uncached, tiny_model_dir, tiny_adapters, system):
    """Requests arriving while others decode, hitting blocks that are being filled and freed."""
    owners = [None, tiny_adapters["a"], tiny_adapters["b"]]
    prompts = [system + encode(tiny_model_dir, f" Thread {i} asks: {PROMPTS[i % 5]}") for i in range(6)]
    expected = [submit_all(uncached, [(p, greedy(MAX_TOKENS), owners[i % 3])])[0].outputs[0].token_ids
                for i, p in enumerate(prompts)]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        time.sleep(0.01 * i)
        results[i] = submit_all(cached, [(prompts[i], greedy(MAX_TOKENS), owners[i % 3])])[0].outputs[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected
    assert_no_leaks(cached)

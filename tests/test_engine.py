"""The engine generates exactly what transformers generates, whatever shares the batch."""

from __future__ import annotations

import threading
import time


from lorax_mlflow.engine.sampling_params import SamplingParams
from tests.engine_support import PROMPTS, encode, greedy, hf_greedy, make_engine


def test_greedy_output_equals_hf_generate_token_for_token(engine, hf_model, tiny_model_dir):
    prompts = [encode(tiny_model_dir, p) for p in PROMPTS]
    streams = [engine.submit(p, greedy(16)) for p in prompts]  # all in flight together
    for prompt, stream in zip(prompts, streams):
        assert stream.result().outputs[0].token_ids == hf_greedy(hf_model, prompt, 16)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def test_requests_joining_and_leaving_a_running_batch_get_the_same_tokens_as_alone(engine, tiny_model_dir):
    prompts = [encode(tiny_model_dir, p) for p in PROMPTS]
    max_tokens = [30, 5, 20, 9, 14]
    alone = [engine.submit(p, greedy(n)).result().outputs[0].token_ids for p, n in zip(prompts, max_tokens)]

    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        time.sleep(0.01 * i)  # staggered arrivals join a batch that is already decoding
        results[i] = engine.submit(prompts[i], greedy(max_tokens[i])).result().outputs[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == alone


def test_seeded_sampling_is_reproducible_whatever_else_shares_the_batch(engine, tiny_model_dir):
    prompt = encode(tiny_model_dir, "Write a poem about")
    params = dict(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50)
    alone = engine.submit(prompt, SamplingParams(seed=1234, **params)).result().outputs[0].token_ids

    others = [engine.submit(encode(tiny_model_dir, p), SamplingParams(max_tokens=25, temperature=1.0)) for p in PROMPTS]
    seeded = engine.submit(prompt, SamplingParams(seed=1234, **params))
    more = [engine.submit(encode(tiny_model_dir, p), SamplingParams(max_tokens=10, seed=7)) for p in PROMPTS[:2]]
    assert seeded.result().outputs[0].token_ids == alone
    for s in others + more:
        s.result()


def test_stop_strings_stop_token_ids_and_max_tokens_finish_with_the_right_reason(engine, tiny_model_dir):
    prompt = encode(tiny_model_dir, PROMPTS[2])
    free = engine.submit(prompt, greedy(20, ignore_eos=True)).result().outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20

    stop_id = free.token_ids[5]
    by_id = engine.submit(prompt, greedy(20, ignore_eos=True, stop_token_ids=[stop_id])).result().outputs[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]

    stop_text = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    by_text = engine.submit(prompt, greedy(20, ignore_eos=True, stop=[stop_text])).result().outputs[0]
    assert by_text.finish_reason == "stop"
    assert by_text.text == free.text[: free.text.index(stop_text)]


def test_streaming_deltas_concatenate_to_the_final_text(engine, tiny_model_dir):
    stream = engine.submit(encode(tiny_model_dir, PROMPTS[0]), greedy(15, ignore_eos=True))
    deltas, last = [], None
    for last in stream:
        deltas.append(last.outputs[0].delta_text)
    assert last.finished and "".join(deltas) == last.outputs[0].text


def test_abort_frees_kv_blocks_at_once(engine, tiny_model_dir):
    stream = engine.submit(encode(tiny_model_dir, PROMPTS[0]), greedy(200, ignore_eos=True))
    next(iter(stream))  # generation has started
    stream.abort()
    deadline = time.time() + 5
    while engine.core.block_manager.num_free_blocks != engine.core.block_manager.num_blocks and time.time() < deadline:
        time.sleep(0.01)
    assert engine.core.block_manager.num_free_blocks == engine.core.block_manager.num_blocks


def test_preemption_under_a_tiny_kv_cache_still_gives_the_reference_tokens(tiny_model_dir, hf_model):
    # 12 blocks of 16 tokens cannot hold 5 sequences of ~50 tokens: the scheduler must preempt and recompute.
    engine = make_engine(tiny_model_dir, kv_cache_bytes=12 * 16 * 2 * 2 * 2 * 16 * 4)
    try:
        assert engine.core.block_manager.num_blocks == 12
        prompts = [encode(tiny_model_dir, p) for p in PROMPTS]
        streams = [engine.submit(p, greedy(40, ignore_eos=True)) for p in prompts]
        for prompt, stream in zip(prompts, streams):
            expected = hf_greedy_no_eos(hf_model, prompt, 40)
            assert stream.result().outputs[0].token_ids == expected
        assert engine.core.block_manager.num_free_blocks == 12
    finally:
        engine.shutdown()


def hf_greedy_no_eos(model, prompt, max_tokens):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def test_core_threads_default_to_every_usable_core_and_can_be_set(monkeypatch):
    from lorax_mlflow.engine.config import EngineConfig

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert EngineConfig(device="cpu").resolved_num_threads() == 3
    assert EngineConfig(device="cpu", num_threads=1).resolved_num_threads() == 1

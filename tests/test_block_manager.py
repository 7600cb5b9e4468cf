"""The block manager's prefix cache: content-addressed full blocks, ref counts, LRU eviction."""

from __future__ import annotations

import pytest

from lorax_mlflow.engine.block_manager import BASE_MODEL_IDENTITY, BlockManager
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.engine.sequence import Sequence

BS = 4


def seq(tokens: list[int]) -> Sequence:
    return Sequence(request_id="r", token_ids=list(tokens), num_prompt_tokens=len(tokens), params=SamplingParams())


def admit(manager: BlockManager, s: Sequence, identity: str = BASE_MODEL_IDENTITY) -> list[int]:
    """What the scheduler does: look up, allocate, register what this step computes."""
    hits = manager.cached_prefix(s, identity)
    assert manager.can_allocate(s, hits)
    manager.allocate(s, hits)
    manager.cache_full_blocks(s, s.num_tokens)
    manager.commit()
    return hits


def assert_all_free(manager: BlockManager) -> None:
    assert manager.num_free_blocks == manager.num_blocks
    assert all(count == 0 for count in manager.ref_counts)


PROMPT = list(range(100, 114))  # 3 full blocks + 2 tokens


def test_a_second_identical_prompt_reuses_the_full_blocks_and_computes_the_rest():
    manager = BlockManager(16, BS)
    first, second = seq(PROMPT), seq(PROMPT)
    assert admit(manager, first) == []
    hits = admit(manager, second)
    assert hits == first.block_table[:3]
    assert second.block_table[:3] == first.block_table[:3] and second.block_table[3] != first.block_table[3]
    assert second.num_cached_tokens == 12
    assert [manager.ref_counts[b] for b in first.block_table[:3]] == [2, 2, 2]
    manager.free(first)
    manager.free(second)
    assert_all_free(manager)


def test_a_prompt_that_is_all_cached_still_computes_its_last_token():
    manager = BlockManager(16, BS)
    first = seq(PROMPT[:12])
    admit(manager, first)
    second = seq(PROMPT[:12])
    assert admit(manager, second) == first.block_table[:2]  # not the third: its last token gives the logits
    assert second.num_cached_tokens == 8


def test_the_longest_cached_run_stops_at_the_first_different_block():
    manager = BlockManager(16, BS)
    first = seq(PROMPT)
    admit(manager, first)
    diverging = seq(PROMPT[:6] + [7] + PROMPT[7:])  # differs inside the second block
    assert admit(manager, diverging) == first.block_table[:1]
    # A block's hash includes its parent: the same third block after a different second one is no hit.
    assert diverging.block_table[2] != first.block_table[2]


def test_the_same_tokens_under_different_adapters_never_share_a_block():
    manager = BlockManager(32, BS)
    under_a, under_b, base = seq(PROMPT), seq(PROMPT), seq(PROMPT)
    admit(manager, under_a, "digest-a")
    assert admit(manager, under_b, "digest-b") == []
    assert admit(manager, base, BASE_MODEL_IDENTITY) == []
    assert not set(under_a.block_table) & set(under_b.block_table)
    assert not set(base.block_table) & (set(under_a.block_table) | set(under_b.block_table))
    again_a = seq(PROMPT)
    assert admit(manager, again_a, "digest-a") == under_a.block_table[:3]


def test_freed_blocks_stay_cached_until_their_memory_is_needed_least_recently_freed_first():
    manager = BlockManager(8, BS)
    old, recent = seq(list(range(8))), seq(list(range(50, 58)))  # 2 full blocks each
    admit(manager, old)
    admit(manager, recent)
    manager.free(old)
    manager.free(recent)
    assert manager.num_free_blocks == 8 and manager.num_cached_blocks == 4

    fresh = seq(list(range(200, 212)))  # 3 blocks: 4 never-cached blocks are taken before any cached one
    admit(manager, fresh)
    assert manager.num_cached_blocks == 4 + 3 and manager.num_evictions == 0
    manager.free(fresh)

    bigger = seq(list(range(300, 320)))  # 5 blocks: one never-cached, then 4 evictions in LRU order
    admit(manager, bigger)
    assert manager.num_evictions == 4
    # old's blocks were freed first (its tail before its head), then recent's, then fresh's tail.
    assert seq_hits(manager, old) == [] and seq_hits(manager, list(range(50, 58))) == []
    assert seq_hits(manager, list(range(200, 212))) != []  # fresh's head block survived


def seq_hits(manager: BlockManager, tokens) -> list[int]:
    tokens = tokens.token_ids if isinstance(tokens, Sequence) else tokens
    return manager.cached_prefix(seq(list(tokens) + [0]), BASE_MODEL_IDENTITY)


def test_a_hit_takes_a_cached_block_out_of_the_evictable_pool():
    manager = BlockManager(4, BS)
    first = seq(PROMPT[:9])  # 3 blocks, two of them full
    admit(manager, first)
    manager.free(first)
    second = seq(PROMPT[:9])
    hits = manager.cached_prefix(second, BASE_MODEL_IDENTITY)
    assert len(hits) == 2
    # 3 blocks needed, 2 are the (unheld) hits: they count against the free pool as well.
    assert manager.can_allocate(second, hits)
    manager.allocate(second, hits)
    assert manager.num_free_blocks == 1
    assert not manager.can_allocate(seq(list(range(500, 509))), [])


def test_blocks_filled_by_decoding_are_cached_too():
    manager = BlockManager(16, BS)
    s = seq(PROMPT[:6])
    admit(manager, s)
    for token in (1, 2, 3):  # decode up to 9 tokens: the second block fills at token 8
        s.token_ids.append(token)
        manager.append_slot(s)
        manager.cache_full_blocks(s, s.num_tokens)
    assert manager.num_cached_blocks == 2
    follow_up = seq(s.token_ids + [42, 43])
    assert admit(manager, follow_up) == s.block_table[:2]


def test_siblings_share_cached_blocks_and_copy_the_partial_one_on_write():
    manager = BlockManager(16, BS)
    head = seq(PROMPT)
    admit(manager, head)
    sibling = seq(PROMPT)
    manager.fork(head, sibling)
    assert [manager.ref_counts[b] for b in head.block_table] == [2, 2, 2, 2]
    for s, token in ((head, 1), (sibling, 2)):
        s.token_ids.append(token)
        manager.append_slot(s)
    assert head.block_table[:3] == sibling.block_table[:3] and head.block_table[3] != sibling.block_table[3]
    for s in (head, sibling):  # each fills its own fourth block: both get cached under their own tokens
        s.token_ids.append(9)
        manager.append_slot(s)
        manager.cache_full_blocks(s, s.num_tokens)
    assert manager.num_cached_blocks == 5
    manager.free(head)
    manager.free(sibling)
    assert_all_free(manager)


def test_a_failed_step_forgets_the_blocks_it_registered():
    manager = BlockManager(16, BS)
    s = seq(PROMPT)
    manager.allocate(s, manager.cached_prefix(s, BASE_MODEL_IDENTITY))
    manager.cache_full_blocks(s, s.num_tokens)
    same_step = seq(PROMPT)
    assert manager.cached_prefix(same_step, BASE_MODEL_IDENTITY) == s.block_table[:3]  # shares the step
    manager.discard_pending()  # the forward pass raised
    manager.free(s)
    assert manager.num_cached_blocks == 0 and manager.cached_prefix(seq(PROMPT), BASE_MODEL_IDENTITY) == []
    assert_all_free(manager)


def test_committed_blocks_survive_a_later_failed_step():
    manager = BlockManager(16, BS)
    admit(manager, seq(PROMPT))
    manager.discard_pending()
    assert len(manager.cached_prefix(seq(PROMPT), BASE_MODEL_IDENTITY)) == 3


def test_preempted_sequence_finds_its_own_blocks_again():
    manager = BlockManager(16, BS)
    s = seq(PROMPT)
    admit(manager, s)
    blocks = list(s.block_table)
    manager.free(s)
    s.num_cached_tokens = 0
    assert admit(manager, s) == blocks[:3]


def test_with_prefix_caching_off_nothing_is_shared():
    manager = BlockManager(16, BS, enable_prefix_caching=False)
    first, second = seq(PROMPT), seq(PROMPT)
    admit(manager, first)
    assert admit(manager, second) == []
    assert not set(first.block_table) & set(second.block_table)
    manager.free(first)
    manager.free(second)
    assert manager.num_cached_blocks == 0
    assert_all_free(manager)


@pytest.mark.parametrize("identity", [BASE_MODEL_IDENTITY, "digest-a"])
def test_many_requests_sharing_a_system_prompt_hold_one_copy_of_it(identity):
    manager = BlockManager(64, BS)
    system = list(range(1000, 1020))  # 5 blocks
    requests = [seq(system + [i, i + 1]) for i in range(8)]
    for s in requests:
        admit(manager, s, identity)
    assert len({tuple(s.block_table[:5]) for s in requests}) == 1
    assert manager.num_blocks - manager.num_free_blocks == 5 + 8
    for s in requests:
        manager.free(s)
    assert_all_free(manager)


@pytest.mark.parametrize("prompt_len, other_holders, expected", [
    (14, 0, 2),  # three beams share a part-filled last block: two copy it, the last keeps it
    (14, 1, 3),  # a fourth holder that does not write: all three copy
    (16, 0, 3),  # the last block is full: each beam takes a fresh block, nothing is copied
])
def test_blocks_to_append_for_beams_that_share_their_last_block(prompt_len, other_holders, expected):
    manager = BlockManager(32, BS, enable_prefix_caching=False)
    parent = seq(PROMPT[:prompt_len] if prompt_len <= 14 else list(range(prompt_len)))
    manager.allocate(parent)
    beams = [parent]
    for _ in range(2 + other_holders):
        child = seq(parent.token_ids)
        manager.fork(parent, child)
        beams.append(child)
    writers = beams[:3]
    for beam in writers:
        beam.token_ids.append(7)  # each beam's next token
    free = manager.num_free_blocks
    assert manager.num_blocks_to_append(writers) == expected
    for beam in writers:
        manager.append_slot(beam)
    assert free - manager.num_free_blocks == expected
    for beam in beams:
        manager.free(beam)
    assert_all_free(manager)

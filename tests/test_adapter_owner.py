"""Which replica serves an adapter (`lorax_mlflow.ray.adapter_owner`): a stable owner per adapter by
rendezvous hashing over the live replicas, left for the adapter's next replica only while the owner
is overloaded. Plain code: no Ray cluster needed."""

from __future__ import annotations

from collections import Counter

import pytest

from lorax_mlflow.ray.adapter_owner import LoadBound, choose_replica, rendezvous_order

ADAPTERS = [f"org/adapter-{i}" for i in range(3000)]


def idle(*replica_ids: str) -> dict[str, int]:
    return {replica_id: 0 for replica_id in replica_ids}


def owners(replica_ids: list[str]) -> dict[str, str]:
    return {adapter: choose_replica(adapter, idle(*replica_ids)) for adapter in ADAPTERS}


def test_an_adapter_keeps_its_owner_whatever_order_the_replicas_are_listed_in():
    forward = owners(["r1", "r2", "r3"])
    assert owners(["r3", "r1", "r2"]) == forward
    assert rendezvous_order("a", ["r1", "r2", "r3"]) == rendezvous_order("a", ["r2", "r3", "r1"])


def test_adapters_spread_evenly_over_the_replicas():
    for replica_ids in (["r1", "r2"], ["r1", "r2", "r3", "r4"]):
        counts = Counter(owners(replica_ids).values())
        share = len(ADAPTERS) / len(replica_ids)
        assert set(counts) == set(replica_ids)
        assert all(abs(count - share) < 0.1 * share for count in counts.values()), counts


def test_a_replica_that_joins_takes_about_one_in_n_adapters_and_only_from_others():
    before = owners(["r1", "r2"])
    after = owners(["r1", "r2", "r3"])
    moved = [adapter for adapter in ADAPTERS if before[adapter] != after[adapter]]
    assert all(after[adapter] == "r3" for adapter in moved)  # nothing moves between the old replicas
    assert abs(len(moved) / len(ADAPTERS) - 1 / 3) < 0.05


def test_a_replica_that_leaves_hands_on_only_its_own_adapters():
    before = owners(["r1", "r2", "r3"])
    after = owners(["r1", "r3"])
    moved = [adapter for adapter in ADAPTERS if before[adapter] != after[adapter]]
    assert moved == [adapter for adapter in ADAPTERS if before[adapter] == "r2"]
    assert abs(len(moved) / len(ADAPTERS) - 1 / 3) < 0.05


def test_an_owner_somewhat_busier_than_the_others_keeps_its_adapters():
    owner, other = rendezvous_order("hot", ["r1", "r2"])
    assert choose_replica("hot", {owner: 6, other: 2}) == owner  # 4 over: within the default slack
    assert choose_replica("hot", {owner: 12, other: 9}) == owner  # far over in requests, not in ratio


def test_an_overloaded_owner_sends_its_adapter_to_the_adapters_next_replica_not_to_any():
    first, second, third, fourth = rendezvous_order("hot", ["r1", "r2", "r3", "r4"])
    loads = {first: 12, second: 3, third: 0, fourth: 1}
    assert choose_replica("hot", loads) == second  # the hot adapter's stable second home
    assert choose_replica("hot", {**loads, second: 9}) == third
    assert choose_replica("hot", {first: 12, second: 12, third: 12, fourth: 0}) == fourth  # the least loaded


def test_the_load_bound_is_configurable():
    owner, other = rendezvous_order("hot", ["r1", "r2"])
    assert choose_replica("hot", {owner: 3, other: 0}, LoadBound(slack=2, ratio=1.0)) == other
    assert choose_replica("hot", {owner: 30, other: 0}, LoadBound(slack=100, ratio=1.0)) == owner


def test_no_replicas_is_an_error():
    with pytest.raises(ValueError):
        choose_replica("a", {})

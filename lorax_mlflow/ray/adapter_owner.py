"""Which replica serves an adapter: a stable owner by rendezvous hashing, load-bounded.

Each adapter ranks the live replicas by a hash of (adapter id, replica id), highest first
(rendezvous, or highest-random-weight, hashing). The first is the adapter's owner, so every
replica's adapter cache holds about 1/N of the adapters instead of churning over all of them, and
when a replica joins or leaves only the adapters it owns (or will own) move: about 1/N of them.
No state is shared between routers: any router that sees the same replicas picks the same owner.

A hot adapter must not pin its owner at full load while another replica idles, so a replica is
skipped while it is *overloaded*: more than `slack` requests above the least-loaded replica and
more than `ratio` times its load (both, as SGLang's cache-aware router tests imbalance). The
request then goes to the adapter's next replica in rendezvous order, which is stable too: a hot
adapter spills onto one second replica rather than onto all of them. The least-loaded replica is
never overloaded, so a choice always exists.

No Ray import here: the policy is plain code, unit-tested without a cluster.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def rendezvous_order(key: str, replica_ids: Iterable[str]) -> list[str]:
    """`replica_ids` in `key`'s order of preference: highest hash of (key, replica) first."""
    return sorted(replica_ids, key=lambda replica_id: _weight(key, replica_id), reverse=True)


def _weight(key: str, replica_id: str) -> tuple[int, str]:
    digest = hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big"), replica_id  # the id breaks (astronomically rare) ties


@dataclass(frozen=True)
class LoadBound:
    """When a replica is too busy to take an adapter it owns (see the module docstring)."""

    slack: int = 4
    """Requests above the least-loaded replica a replica may carry and still be chosen."""
    ratio: float = 1.5
    """...or times the least-loaded replica's requests."""

    def overloaded(self, load: int, least: int) -> bool:
        return load - least > self.slack and load > self.ratio * least


def choose_replica(key: str, loads: Mapping[str, int], bound: LoadBound = LoadBound()) -> str:
    """The replica for adapter `key`: its first replica in rendezvous order that is not overloaded.

    ``loads``: ongoing requests per live replica id (must not be empty).
    """
    if not loads:
        raise ValueError("no replicas to choose from")
    least = min(loads.values())
    return next(replica_id for replica_id in rendezvous_order(key, loads)
                if not bound.overloaded(loads[replica_id], least))

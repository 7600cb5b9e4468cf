"""Serve's request router for the engine replicas: each adapter's requests go to its owner replica.

Serve's default router with model multiplexing only prefers a replica that already holds an
adapter; an adapter held nowhere goes to any lightly loaded replica, so popular adapters end up on
every replica and each replica's cache churns over all of them. This router gives every adapter
a stable owner instead (`adapter_owner.choose_replica`: rendezvous hashing over the live replicas,
skipping an overloaded owner), so each replica's cache covers about 1/N of the adapters.

It runs inside the ingress's deployment handle (``request_router_config`` of the replicas'
deployment). The ingress names the adapter as the request's multiplexed model id; requests that
name none (base model, merges) go to the less loaded of two random replicas, Serve's default.
Loads are the handle's own count of ongoing requests per replica (Serve's queue-length cache,
refreshed on every send and completion), probed from the replicas when not cached.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from lorax_mlflow.ray.adapter_owner import LoadBound, choose_replica, rendezvous_order


class AdapterOwnerRouter(RequestRouter):
    """Adapter requests to the adapter's owner replica, unless that one is overloaded."""

    def initialize_state(self, slack: int = LoadBound.slack, ratio: float = LoadBound.ratio) -> None:
        """Called by Serve with ``request_router_kwargs``: the `LoadBound` of an owner."""
        self._bound = LoadBound(slack, ratio)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas to try: the chosen replica, then the others (least loaded first among
        them, taken only when the chosen one refuses the request because its queue is full)."""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # when every rank refuses, wait a bit
        adapter_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not adapter_id or len(candidate_replicas) < 2:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        loads = await self._loads(candidate_replicas)
        order = rendezvous_order(adapter_id, by_id)
        if not loads:  # no replica answered: let Serve probe them in the adapter's order
            return [[by_id[replica_id]] for replica_id in order]
        chosen = choose_replica(adapter_id, loads, self._bound)
        return [[by_id[chosen]], [by_id[replica_id] for replica_id in order if replica_id != chosen]]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Ongoing requests per replica id, from the queue-length cache, else probed; replicas that
        do not answer the probe are left out."""
        loads: dict[str, int] = {}
        unknown = []
        for replica in replicas:
            queue_len = self.replica_queue_len_cache.get(replica.replica_id)
            if queue_len is None:
                unknown.append(replica)
            else:
                loads[replica.replica_id.unique_id] = queue_len
        if unknown:
            for replica, queue_len in await self._probe_queue_lens(unknown, 0):
                if queue_len is not None:
                    loads[replica.replica_id.unique_id] = queue_len
        return loads

"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

A step holds at most ``max_num_batched_tokens`` tokens: first one token for every decoding
sequence, then prefill chunks, the prompts being prefilled oldest first, then newly admitted
requests while the sequence cap and the free KV blocks allow. While sequences are decoding, the
step's prefill share is capped by :class:`PrefillBudget` so that a long prompt is spread over
several steps instead of stalling every stream for its whole prefill (chunked prefill); a chunk
that does not reach the end of its sequence's tokens samples nothing. A waiting request whose
adapter is still loading is skipped, not blocking the ones behind it. When a running sequence
cannot get a block, the most recently admitted one is preempted: its blocks are freed and it goes
back to the front of the queue to be recomputed later.

The sequences of an ``n`` > 1 request share their prompt's blocks: the first one prefills them and
the others sample from its last-token logits in the step that completes the prompt.

A beam search (engine/beam.py) is admitted as its head sequence, with seats held for all its beams;
its live beams are then scheduled together or not at all, forked after each step by
:meth:`Scheduler.advance_beams`, and preempted together: preempting any of them restarts the
search from its prompt.

Prefix caching: an admitted request starts its prefill after the longest run of cached full blocks
of its tokens under the weights of its adapter slot (see block_manager); every block a step
completes is offered to the cache as it is scheduled, so a request admitted in the same step
already shares it. Requests are admitted only once every prefill under way has been given the
rest of its prompt in this step, so a shared prefix is never computed twice at once. Cached
blocks nobody holds count as free, so they are evicted before any running sequence is preempted.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from lorax_mlflow.engine.beam import BeamSearch, Continuation
from lorax_mlflow.engine.block_manager import BASE_MODEL_IDENTITY, BlockManager
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.prefill_budget import PrefillBudget
from lorax_mlflow.engine.scheduled import ScheduledSequence
from lorax_mlflow.engine.sequence import Sequence, SequenceStatus
from lorax_mlflow.errors import LoraxError

logger = logging.getLogger(__name__)


class AdapterSlots(Protocol):
    def acquire(self, adapter_key: str | None) -> int | None:
        """Device slot for the adapter (-1 for the base model), None while it is loading; raises if it failed."""

    def release(self, slot: int) -> None: ...

    def slot_digest(self, slot: int) -> str:
        """Content digest of the adapter in `slot`: the identity its K/V is cached under."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    failed: list[tuple[str, LoraxError]] = field(default_factory=list)
    """(request id, error) of requests that cannot run (their adapter failed to load)."""
    num_decode_tokens: int = 0
    num_prefill_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_batched_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def sampling(self) -> list[ScheduledSequence]:
        """The scheduled sequences that produce a token this step, in schedule order."""
        return [item for item in self.scheduled if item.samples]


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, adapter_slots: AdapterSlots) -> None:
        self.config = config
        self.block_manager = block_manager
        self.adapter_slots = adapter_slots
        self.prefill_budget = PrefillBudget(
            config.max_num_batched_tokens, config.prefill_chunk_tokens, config.prefill_chunk_cost_ratio
        )
        self.waiting: deque[list[Sequence]] = deque()
        """Groups admitted together: a new request's sequences, or one preempted sequence."""
        self.running: list[Sequence] = []
        """Every admitted sequence (holding blocks and an adapter slot), in admission order."""
        self.prefilling: dict[Sequence, list[Sequence]] = {}
        """Admitted sequences whose tokens are not all in the KV cache yet -> their siblings that
        wait for that prefill, oldest first."""
        self._sibling_of: dict[Sequence, Sequence] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, sequences: list[Sequence]) -> None:
        """Queue a new request's sequences, admitted together."""
        self.waiting.append(list(sequences))

    def schedule(self) -> SchedulerOutput:
        """The next step. Calling it again means the previous step ran (see :meth:`step_failed`)."""
        self.block_manager.commit()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._schedule_decodes(out, budget)
        budget -= out.num_decode_tokens
        prefill = min(budget, self.prefill_budget.tokens(out.num_decode_tokens))
        for head in list(self.prefilling):
            if prefill <= 0:
                break
            prefill -= self._schedule_chunk(out, head, prefill)
        self._admit_prefills(out, prefill)
        return out

    def record_step_time(self, out: SchedulerOutput, seconds: float) -> None:
        """Tell the prefill budget how long the step of `out` took (forward, sampling and outputs)."""
        self.prefill_budget.observe(out.num_decode_tokens, out.num_prefill_tokens, seconds)

    def _is_prefilling(self, seq: Sequence) -> bool:
        return seq in self.prefilling or seq in self._sibling_of

    def _seats_taken(self) -> int:
        """Running sequences, plus the seats of the beams a search still prefilling its prompt will fork."""
        return len(self.running) + sum(seq.beam.width - 1 for seq in self.prefilling if seq.beam is not None)

    def _schedule_decodes(self, out: SchedulerOutput, budget: int) -> None:
        searches: set[BeamSearch] = set()
        for seq in list(self.running):
            if out.num_decode_tokens >= budget:
                break  # the rest decode next step
            if seq.status is not SequenceStatus.RUNNING or self._is_prefilling(seq):
                continue  # preempted earlier in this loop, or not decoding yet
            if seq.beam is not None:
                if seq.beam not in searches:
                    searches.add(seq.beam)
                    self._schedule_beams(out, seq.beam, budget)
                continue
            drafts = seq.draft_token_ids[: max(budget - out.num_decode_tokens - 1, 0)]
            if drafts and not self.block_manager.can_append(seq, len(drafts)):
                drafts = []  # speculation never costs a preemption
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            copy = self.block_manager.append_slot(seq, len(drafts))
            if copy is not None:
                out.block_copies.append(copy)
            self.block_manager.cache_full_blocks(seq, seq.num_tokens)  # drafts past it are never cached
            new_tokens = seq.num_tokens - seq.num_cached_tokens + len(drafts)
            out.scheduled.append(ScheduledSequence(seq, new_tokens, draft_token_ids=drafts))
            out.num_decode_tokens += 1 + len(drafts)

    def _schedule_beams(self, out: SchedulerOutput, search: BeamSearch, budget: int) -> None:
        """Schedule every live beam of `search` for one token, or none of them (they step together).
        A search may exceed the token budget when it comes first, else it could never run."""
        beams = list(search.live)
        if out.num_decode_tokens and out.num_decode_tokens + len(beams) > budget:
            return
        while self.block_manager.num_blocks_to_append(beams) > self.block_manager.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            if victim.beam is search:
                return
        for seq in beams:
            copy = self.block_manager.append_slot(seq)
            if copy is not None:
                out.block_copies.append(copy)
            self.block_manager.cache_full_blocks(seq, seq.num_tokens)
            out.scheduled.append(ScheduledSequence(seq, seq.num_tokens - seq.num_cached_tokens))
            out.num_decode_tokens += 1

    def advance_beams(self, search: BeamSearch, chosen: list[Continuation]) -> None:
        """After a step of `search`: `chosen` become its live beams (none once it is done).

        A beam continued once goes on as itself; each further continuation is a new sequence sharing
        its blocks (copy-on-write when it next appends); a beam not continued frees its blocks. The
        group keeps its place in ``running`` (its preemption priority).
        """
        parents = list(search.live)
        if search.done:
            for seq in parents:
                self.finish(seq, "stop")
            return
        beams: list[Sequence] = []
        continued: set[int] = set()
        for continuation in chosen:
            parent = parents[continuation.parent]
            if continuation.parent not in continued:
                continued.add(continuation.parent)
                beams.append(parent)
                continue
            child = search.copy_of(parent)
            self.block_manager.fork(parent, child)
            slot = self.adapter_slots.acquire(child.adapter_key)
            assert slot is not None, "a running beam's adapter holds its slot"
            child.lora_slot = slot
            beams.append(child)
        at = self.running.index(parents[0])
        for index, parent in enumerate(parents):
            if index not in continued:
                self.finish(parent, "stop")
        members = set(parents)
        self.running = [seq for seq in self.running if seq not in members]
        self.running[at:at] = beams
        search.advance(beams, chosen)

    def _schedule_chunk(self, out: SchedulerOutput, head: Sequence, budget: int) -> int:
        """Schedule the next prefill chunk of `head` (at most `budget` tokens); returns its size."""
        remaining = head.num_tokens - head.num_cached_tokens
        count = min(remaining, budget)
        completes = count == remaining
        out.scheduled.append(ScheduledSequence(head, count, samples=completes))
        out.num_prefill_tokens += count
        self.block_manager.cache_full_blocks(head, head.num_cached_tokens + count)
        if completes:
            siblings = self.prefilling.pop(head)
            for seq in siblings:
                del self._sibling_of[seq]
            out.scheduled.extend(ScheduledSequence(seq, 0, logits_from=head) for seq in siblings)
        return count

    def _admit_prefills(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[list[Sequence]] = []
        while self.waiting and budget > 0 and self._seats_taken() < self.config.max_num_seqs:
            group = self.waiting.popleft()
            if all(s.is_finished for s in group):
                continue
            head = group[0]
            seats = head.beam.width if head.beam is not None else len(group)
            if self._seats_taken() + seats > self.config.max_num_seqs:
                self.waiting.appendleft(group)
                break
            try:
                slots = self._acquire_slots(group)
            except LoraxError as error:
                out.failed.append((head.request_id, error))
                continue
            if slots is None:
                skipped.append(group)  # adapter still loading: let the others through
                continue
            hits = self._cached_prefix(head, slots[0])
            if not self.block_manager.can_allocate(head, hits):
                self._release_slots(slots)
                self.waiting.appendleft(group)
                break
            self.block_manager.allocate(head, hits)  # the prefill starts after the cached blocks
            if head.num_cached_prompt_tokens is None:
                head.num_cached_prompt_tokens = head.num_cached_tokens
            for seq in group[1:]:
                self.block_manager.fork(head, seq)
                self._sibling_of[seq] = head
            for seq, slot in zip(group, slots):
                seq.lora_slot = slot
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            self.prefilling[head] = group[1:]
            budget -= self._schedule_chunk(out, head, budget)
        self.waiting.extendleft(reversed(skipped))

    def _cached_prefix(self, seq: Sequence, slot: int) -> list[int]:
        """Cached blocks `seq` can start from, under the identity of the weights in its slot.

        A request asking for prompt logprobs bypasses the cache (it needs logits at every prompt
        position); the blocks it computes are still cached for the others.
        """
        identity = BASE_MODEL_IDENTITY if slot == -1 else self.adapter_slots.slot_digest(slot)
        hits = self.block_manager.cached_prefix(seq, identity)
        return [] if seq.params.prompt_logprobs is not None else hits

    def _acquire_slots(self, group: list[Sequence]) -> list[int] | None:
        key = group[0].adapter_key
        slots: list[int] = []
        for _ in group:
            slot = self.adapter_slots.acquire(key)
            if slot is None:
                self._release_slots(slots)
                return None
            slots.append(slot)
        return slots

    def _release_slots(self, slots: list[int]) -> None:
        for slot in slots:
            if slot != -1:
                self.adapter_slots.release(slot)

    def step_failed(self) -> None:
        """The scheduled step raised: the K/V it was to compute must never be reused."""
        self.block_manager.discard_pending()

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq` (with the siblings waiting on its prefill) and queue it for recomputation;
        a beam frees its whole search, which starts over from its prompt."""
        if seq.beam is not None:
            logger.debug("preempting the beam search of request %s (it starts over)", seq.request_id)
            for member in seq.beam.live:
                self._release(member)
                member.status = SequenceStatus.WAITING
            self.waiting.appendleft([seq.beam.restart()])
            return
        logger.debug("preempting sequence %s (recompute)", seq.seq_id)
        group = [seq, *self.prefilling.get(seq, [])]
        for member in group:
            self._release(member)
            member.status = SequenceStatus.WAITING
            member.num_cached_tokens = 0
            member.draft_token_ids = []
        self.waiting.appendleft(group)

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        for sibling in self.prefilling.pop(seq, []):  # released with it (preemption, abort)
            del self._sibling_of[sibling]
        head = self._sibling_of.pop(seq, None)
        if head is not None:
            self.prefilling[head].remove(seq)
        self.block_manager.free(seq)
        self._release_slots([seq.lora_slot])
        seq.lora_slot = -1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and give back its blocks and adapter slot."""
        if seq.status is SequenceStatus.RUNNING:
            self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, sequences: list[Sequence], reason: str = "abort") -> None:
        """Finish `sequences` (one request's, or some of them) and drop them from the queue."""
        for seq in sequences:
            if not seq.is_finished:
                self.finish(seq, reason)
        self.waiting = deque(g for g in self.waiting if not all(s.is_finished for s in g))

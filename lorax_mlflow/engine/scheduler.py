"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Every step decodes all running sequences (one token each) and admits waiting requests as prefills
while the token budget, the sequence cap and the free KV blocks allow. A waiting request whose
adapter is still loading is skipped, not blocking the ones behind it. When a running sequence
cannot get a block, the most recently admitted one is preempted: its blocks are freed and it goes
back to the front of the queue to be recomputed later.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from lorax_mlflow.engine.block_manager import BlockManager
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.engine.request import Request
from lorax_mlflow.engine.sequence import Sequence, SequenceStatus
from lorax_mlflow.errors import LoraxError

logger = logging.getLogger(__name__)


class AdapterSlots(Protocol):
    def acquire(self, adapter_key: str | None) -> int | None:
        """Device slot for the adapter (-1 for the base model), None while it is loading; raises if it failed."""

    def release(self, slot: int) -> None: ...


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    """Tokens fed this step; 0 for a sibling that reuses its parent's prefill logits."""
    logits_from: Sequence | None = None
    """For a sibling sharing its parent's prefill: whose last-token logits it samples from."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    failed: list[tuple[Request, LoraxError]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, adapter_slots: AdapterSlots) -> None:
        self.config = config
        self.block_manager = block_manager
        self.adapter_slots = adapter_slots
        self.waiting: deque[list[Sequence]] = deque()
        """Groups admitted together: a new request's sequences, or one preempted sequence."""
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(list(request.sequences))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget -= self._schedule_decodes(out)
        self._admit_prefills(out, budget)
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> int:
        scheduled = 0
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            copy = self.block_manager.append_slot(seq)
            if copy is not None:
                out.block_copies.append(copy)
            out.scheduled.append(ScheduledSequence(seq, seq.num_tokens - seq.num_cached_tokens))
            scheduled += 1
        return scheduled

    def _admit_prefills(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[list[Sequence]] = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            group = self.waiting.popleft()
            if group[0].request.finished or all(s.is_finished for s in group):
                continue
            head = group[0]
            prefill_tokens = head.num_tokens
            if out.scheduled and prefill_tokens > budget:
                self.waiting.appendleft(group)
                break
            if len(self.running) + len(group) > self.config.max_num_seqs or not self.block_manager.can_allocate(head):
                self.waiting.appendleft(group)
                break
            try:
                slots = self._acquire_slots(group)
            except LoraxError as error:
                out.failed.append((head.request, error))
                continue
            if slots is None:
                skipped.append(group)  # adapter still loading: let the others through
                continue
            self.block_manager.allocate(head)
            for seq in group[1:]:
                self.block_manager.fork(head, seq)
            for seq, slot in zip(group, slots):
                seq.lora_slot = slot
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            request = head.request
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.time()
            out.scheduled.append(ScheduledSequence(head, prefill_tokens))
            out.scheduled.extend(ScheduledSequence(seq, 0, logits_from=head) for seq in group[1:])
            budget -= prefill_tokens
        self.waiting.extendleft(reversed(skipped))

    def _acquire_slots(self, group: list[Sequence]) -> list[int] | None:
        key = group[0].request.adapter_key
        slots: list[int] = []
        for _ in group:
            slot = self.adapter_slots.acquire(key)
            if slot is None:
                for taken in slots:
                    self.adapter_slots.release(taken)
                return None
            slots.append(slot)
        return slots

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting sequence %s (recompute)", seq.seq_id)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_cached_tokens = 0
        self.waiting.appendleft([seq])

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.block_manager.free(seq)
        if seq.lora_slot != -1:
            self.adapter_slots.release(seq.lora_slot)
        seq.lora_slot = -1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and give back its blocks and adapter slot."""
        if seq.status is SequenceStatus.RUNNING:
            self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request: Request, reason: str = "abort") -> None:
        for seq in request.sequences:
            if not seq.is_finished:
                self.finish(seq, reason)
        self.waiting = deque(g for g in self.waiting if g[0].request is not request)

"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, copy-on-write, prefix cache.

Blocks are shared (ref count > 1) between the sequences of one request that forked from the same
prompt (``n`` > 1), between the beams of a beam search that forked from the same beam, and
between requests whose prompts start alike. A sequence about to write
into a shared block gets its own copy first; the copy is returned to the caller so the runner can
copy the K/V rows before the forward pass.

Prefix cache: every full block whose K/V is computed is content-addressed by
``hash(parent block hash, its tokens)``, the chain starting from the identity of the weights that
computed it (the base model, or an adapter's content digest), so K/V computed under one adapter
is never reused under another. A new sequence takes the longest run of cached blocks matching its
prompt. Blocks nobody holds any more keep their K/V and their hash and are handed out again,
least recently freed first, only when no never-cached block is left: cached blocks go before any
running sequence has to be preempted, since the scheduler preempts only when no block is free.

A block is registered as soon as the step that computes it is scheduled, so requests admitted in
the same step share it (each layer writes all the step's K/V before any attention reads it).
Until :meth:`commit` those registrations are pending; :meth:`discard_pending` forgets them when
the step failed and their K/V may never have been written.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from lorax_mlflow.engine.sequence import Sequence

BASE_MODEL_IDENTITY = "base-model"
"""Prefix-cache identity of K/V computed by the base model alone (adapters use their content digest)."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def root_hash(identity: str) -> bytes:
    """The chain's start for K/V computed with the weights named by `identity`."""
    return hashlib.sha256(b"lorax-kv-prefix\0" + identity.encode()).digest()


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        """Hash -> block holding that K/V (held by sequences or evictable)."""
        self.free_blocks: deque[int] = deque(range(num_blocks))
        """Unreferenced blocks without cached content: taken first."""
        self.evictable: OrderedDict[int, None] = OrderedDict()
        """Unreferenced blocks that still hold cached K/V, least recently freed first."""
        self._pending: list[int] = []
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can take now (cached-but-unused ones included)."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            self._uncache(block)
            self.num_evictions += 1
        self.ref_counts[block] = 1
        return block

    def _hold(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def _uncache(self, block: int) -> None:
        digest = self.block_hashes[block]
        if digest is not None and self.cached.get(digest) == block:
            del self.cached[digest]
        self.block_hashes[block] = None

    # ----- prefix cache -----------------------------------------------------------------------
    def _hash_full_blocks(self, seq: Sequence, identity: str, num_blocks: int) -> list[bytes]:
        """The hash chain of `seq`'s first `num_blocks` blocks under `identity` (extended as needed)."""
        if seq.hash_identity != identity:
            seq.hash_identity, seq.block_chain = identity, []
        chain, size = seq.block_chain, self.block_size
        while len(chain) < num_blocks:
            parent = chain[-1] if chain else root_hash(identity)
            i = len(chain)
            chain.append(block_hash(parent, seq.token_ids[i * size : (i + 1) * size]))
        return chain

    def cached_prefix(self, seq: Sequence, identity: str) -> list[int]:
        """The cached blocks holding `seq`'s longest cached run of full prompt blocks under `identity`.

        Leaves at least the last token uncached: its forward pass gives the next-token logits.
        Looks only; :meth:`allocate` takes them.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for digest in self._hash_full_blocks(seq, identity, (seq.num_tokens - 1) // self.block_size):
            block = self.cached.get(digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_full_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Register the full blocks of `seq` whose K/V is computed once `num_computed_tokens` are.

        Needs the identity set by :meth:`cached_prefix`. A block whose content is cached already
        (computed twice in one step) stays private and is freed normally.
        """
        if not self.enable_prefix_caching or seq.hash_identity is None:
            return
        full = min(num_computed_tokens, seq.num_tokens) // self.block_size
        if full <= seq.num_registered_blocks:
            return
        chain = self._hash_full_blocks(seq, seq.hash_identity, full)
        for i in range(seq.num_registered_blocks, full):
            block = seq.block_table[i]
            if self.block_hashes[block] is None and chain[i] not in self.cached:
                self.block_hashes[block] = chain[i]
                self.cached[chain[i]] = block
                self._pending.append(block)
        seq.num_registered_blocks = full

    def commit(self) -> None:
        """The step that computes the pending blocks' K/V has run."""
        self._pending.clear()

    def discard_pending(self) -> None:
        """The step failed: its blocks' K/V may be missing, so they must never be hit."""
        for block in self._pending:
            if self.block_hashes[block] is None:
                continue
            self._uncache(block)
            if block in self.evictable:
                del self.evictable[block]
                self.free_blocks.append(block)
        self._pending.clear()

    # ----- sequences --------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, hits: list[int] | None = None) -> bool:
        """Whether `seq` fits, reusing the cached blocks `hits` (unheld ones count as taken too)."""
        hits = hits or []
        reviving = sum(1 for block in hits if self.ref_counts[block] == 0)
        new = blocks_needed(seq.num_tokens, self.block_size) - len(hits)
        return new + reviving <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int] | None = None) -> None:
        """Give `seq` blocks for all its current tokens: the cached `hits` first, then fresh ones.

        Marks the hit tokens as computed (``num_cached_tokens``), so the prefill starts after them.
        """
        assert not seq.block_table, "sequence already holds blocks"
        hits = hits or []
        for block in hits:
            self._hold(block)
        fresh = [self._take() for _ in range(blocks_needed(seq.num_tokens, self.block_size) - len(hits))]
        seq.block_table = [*hits, *fresh]
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_registered_blocks = len(hits)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (same tokens so far, copy-on-write later)."""
        assert not child.block_table, "sequence already holds blocks"
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.hash_identity, child.block_chain = parent.hash_identity, list(parent.block_chain)
        child.num_registered_blocks = parent.num_registered_blocks

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; cached ones stay reusable, its tail evicted first."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is None:
                    self.free_blocks.append(block)
                else:
                    self.evictable[block] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def can_append(self, seq: Sequence, num_drafts: int = 0) -> bool:
        """Whether `seq` can grow by one token plus `num_drafts` speculative ones (new blocks, and a copy
        of its last block if that one is shared)."""
        first = (seq.num_tokens - 1) // self.block_size
        new = blocks_needed(seq.num_tokens + num_drafts, self.block_size) - len(seq.block_table)
        shared = first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1
        return max(new, 0) + shared <= self.num_free_blocks

    def num_blocks_to_append(self, seqs: list[Sequence]) -> int:
        """Blocks :meth:`append_slot` takes to grow each of `seqs` by one token, in turn (beams that share
        their last block: each copies it but the last holder, which keeps it)."""
        new = 0
        writers: dict[int, int] = {}
        for seq in seqs:
            new += max(blocks_needed(seq.num_tokens, self.block_size) - len(seq.block_table), 0)
            index = (seq.num_tokens - 1) // self.block_size
            if index < len(seq.block_table):
                block = seq.block_table[index]
                writers[block] = writers.get(block, 0) + 1
        copies = sum(count - (self.ref_counts[block] == count) for block, count in writers.items())
        return new + copies

    def append_slot(self, seq: Sequence, num_drafts: int = 0) -> tuple[int, int] | None:
        """Make room for the token at position ``num_tokens - 1`` and `num_drafts` draft tokens after it.

        Returns ``(src_block, dst_block)`` when a shared block had to be copied, else None.
        """
        while len(seq.block_table) < blocks_needed(seq.num_tokens + num_drafts, self.block_size):
            seq.block_table.append(self._take())
        index = (seq.num_tokens - 1) // self.block_size
        block = seq.block_table[index]
        if self.ref_counts[block] == 1:
            return None
        self.ref_counts[block] -= 1
        copy = self._take()
        seq.block_table[index] = copy
        return block, copy

    def release_draft_blocks(self, seq: Sequence) -> None:
        """Speculation rollback: free the blocks past ``num_tokens`` that held only rejected drafts' K/V.

        Stale K/V of rejected drafts inside a kept block is harmless: attention reads only a
        sequence's first ``num_tokens`` positions, and the next tokens overwrite those slots.
        """
        keep = blocks_needed(seq.num_tokens, self.block_size)
        for block in seq.block_table[keep:]:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        del seq.block_table[keep:]

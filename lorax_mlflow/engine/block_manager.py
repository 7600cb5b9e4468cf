"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, copy-on-write.

Blocks are shared (ref count > 1) between the sequences of one request that forked from the same
prompt (``n`` > 1). A sequence about to write into a shared block gets its own copy first; the
copy is returned to the caller so the runner can copy the K/V rows before the forward pass.
"""

from __future__ import annotations

from collections import deque

from lorax_mlflow.engine.sequence import Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def can_allocate(self, seq: Sequence) -> bool:
        return blocks_needed(seq.num_tokens, self.block_size) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` blocks for all its current tokens (prefill)."""
        assert not seq.block_table, "sequence already holds blocks"
        seq.block_table = [self._take() for _ in range(blocks_needed(seq.num_tokens, self.block_size))]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let `child` share every block of `parent` (same prompt, copy-on-write later)."""
        assert not child.block_table, "sequence already holds blocks"
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)

    def free(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table = []

    def can_append(self, seq: Sequence, num_drafts: int = 0) -> bool:
        """Whether `seq` can grow by one token plus `num_drafts` speculative ones (new blocks, and a copy
        of its last block if that one is shared)."""
        first = (seq.num_tokens - 1) // self.block_size
        new = blocks_needed(seq.num_tokens + num_drafts, self.block_size) - len(seq.block_table)
        shared = first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1
        return max(new, 0) + shared <= self.num_free_blocks

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

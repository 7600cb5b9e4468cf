"""The attention context of one step, read by the registered attention function.

The runner builds it once per step (all index and mask work happens here, once, not per layer)
and sets it around the forward pass. The step's tokens are packed with the one-token rows
(decodes) first, then one contiguous run of tokens per prefill chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_local = threading.local()


_GROUP_GROWTH = 4
"""A decode group holds rows whose block counts are within this factor of its shortest row's..."""
_GROUP_MIN_BLOCKS = 8
"""...or at most this many blocks (padding a short context costs less than another attention call)."""


@dataclass
class DecodeGroup:
    """Decode rows attended together, each over its own context padded to the group's longest."""

    rows: slice | torch.Tensor
    """Which of the step's decode rows (packed tokens 0..n-1): a slice when they are all of them."""
    block_tables: torch.Tensor
    """[rows, max_blocks] KV block of each context block of each row (padding -> block 0)."""
    key_mask: torch.Tensor
    """[rows, 1, 1, max_blocks * block_size] bool: which context positions the row sees."""


@dataclass
class DecodeRows:
    """The step's first ``num_rows`` tokens: one query row each, over its paged context.

    Rows are grouped by context length so that one long conversation does not make every other
    decode row read (and pad to) its whole context: a group's rows are within `_GROUP_GROWTH`x
    of each other's block counts, so padding at most about quadruples a row's reads."""

    num_rows: int
    groups: list[DecodeGroup]


@dataclass
class PrefillChunk:
    """A run of ``num_tokens`` new tokens of one sequence, starting at packed token ``start``."""

    start: int
    num_tokens: int
    block_table: torch.Tensor | None
    """[blocks] the sequence's KV blocks, when earlier tokens are cached (None: the chunk is the
    whole context, attended from its own keys with a plain causal mask)."""
    folded_mask: torch.Tensor | None
    """[group * num_tokens, blocks * block_size] bool, when earlier tokens are cached: query row
    (g, i) (the g-th query head of a KV head, chunk token i) sees context positions up to its own."""


@dataclass
class AttentionContext:
    kv_cache: torch.Tensor
    """[num_layers, 2, num_slots, num_kv_heads, head_dim]; slot = block * block_size + offset."""
    block_size: int
    slot_mapping: torch.Tensor
    """[T] cache slot of each new token."""
    decodes: DecodeRows | None
    chunks: list[PrefillChunk]


def current_attention_context() -> AttentionContext:
    context = getattr(_local, "context", None)
    if context is None:
        raise RuntimeError("lorax paged attention called outside an engine step")
    return context


@contextmanager
def attention_context(context: AttentionContext) -> Iterator[None]:
    _local.context = context
    try:
        yield
    finally:
        _local.context = None


def build_attention_context(
    kv_cache: torch.Tensor,
    block_tables: list[list[int]],
    context_lens: list[int],
    query_lens: list[int],
    block_size: int,
    query_group_size: int,
    device: torch.device,
) -> AttentionContext:
    """Index tensors for sequences whose last `query_lens[i]` of `context_lens[i]` tokens are new.

    Sequences with one new token must come first. `query_group_size` is query heads per KV head.
    """
    num_decodes = sum(1 for q in query_lens if q == 1)
    if any(q == 1 for q in query_lens[num_decodes:]):
        raise ValueError("one-token rows must be packed before the prefill chunks")

    slots: list[int] = []
    for table, c, q in zip(block_tables, context_lens, query_lens):
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(c - q, c))

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    decodes = None
    if num_decodes:
        groups = []
        row_groups = _decode_row_groups([len(t) for t in block_tables[:num_decodes]])
        for rows in row_groups:
            lens = torch.tensor([context_lens[r] for r in rows], dtype=torch.long)
            max_blocks = max(len(block_tables[r]) for r in rows)
            tables = torch.zeros(len(rows), max_blocks, dtype=torch.long)
            for i, r in enumerate(rows):
                tables[i, : len(block_tables[r])] = torch.tensor(block_tables[r], dtype=torch.long)
            positions = torch.arange(max_blocks * block_size)
            mask = (positions[None, :] < lens[:, None])[:, None, None, :]
            index = slice(0, num_decodes) if len(row_groups) == 1 else dev(torch.tensor(rows, dtype=torch.long))
            groups.append(DecodeGroup(index, dev(tables), dev(mask)))
        decodes = DecodeRows(num_decodes, groups)

    chunks: list[PrefillChunk] = []
    start = num_decodes
    for table, c, q in zip(block_tables[num_decodes:], context_lens[num_decodes:], query_lens[num_decodes:]):
        if c == q:
            chunks.append(PrefillChunk(start, q, None, None))
        else:
            used = table[: (c + block_size - 1) // block_size]
            rows = torch.arange(c - q, c)  # absolute position of each new token
            mask = torch.arange(len(used) * block_size)[None, :] <= rows[:, None]  # whole blocks: aligned keys
            folded = mask.repeat(query_group_size, 1)
            chunks.append(PrefillChunk(start, q, dev(torch.tensor(used, dtype=torch.long)), dev(folded)))
        start += q

    return AttentionContext(
        kv_cache=kv_cache,
        block_size=block_size,
        slot_mapping=dev(torch.tensor(slots, dtype=torch.long)),
        decodes=decodes,
        chunks=chunks,
    )


def _decode_row_groups(num_blocks: list[int]) -> list[list[int]]:
    """Decode rows grouped by block count (each group in ascending order of blocks); one group, in
    packed order, when the lengths are alike."""
    order = sorted(range(len(num_blocks)), key=num_blocks.__getitem__)
    groups: list[list[int]] = [[]]
    for row in order:
        group = groups[-1]
        if group and num_blocks[row] > max(_GROUP_GROWTH * num_blocks[group[0]], _GROUP_MIN_BLOCKS):
            groups.append([row])
        else:
            group.append(row)
    return groups if len(groups) > 1 else [list(range(len(num_blocks)))]

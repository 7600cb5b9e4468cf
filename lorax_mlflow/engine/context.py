"""The attention context of one step, read by the registered attention function.

The runner builds it once per step (all index and mask work happens here, once, not per layer)
and sets it around the forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_local = threading.local()


@dataclass
class AttentionContext:
    kv_cache: torch.Tensor
    """[num_layers, 2, num_slots, num_kv_heads, head_dim]; slot = block * block_size + offset."""
    slot_mapping: torch.Tensor
    """[T] cache slot of each new token."""
    kv_gather: torch.Tensor
    """[B, Lmax] cache slot of each context position of each sequence (padding -> 0)."""
    query_gather: torch.Tensor
    """[B, Qmax] packed token index of each query row (padding -> 0)."""
    query_scatter: torch.Tensor
    """[T] row of each packed token in the flattened [B * Qmax] query layout."""
    attn_mask: torch.Tensor
    """[B, 1, Qmax, Lmax] bool: causal over each sequence's own context only."""


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
    device: torch.device,
) -> AttentionContext:
    """Index tensors for sequences whose last `query_lens[i]` of `context_lens[i]` tokens are new."""
    batch = len(context_lens)
    q_lens = torch.tensor(query_lens, dtype=torch.long)
    c_lens = torch.tensor(context_lens, dtype=torch.long)
    q_max, l_max = int(q_lens.max()), int(c_lens.max())
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.zeros(batch, max_blocks, dtype=torch.long)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = torch.tensor(table, dtype=torch.long)

    positions = torch.arange(l_max)
    kv_gather = tables[:, positions // block_size] * block_size + positions % block_size
    kv_gather = torch.where(positions[None, :] < c_lens[:, None], kv_gather, 0)

    starts = torch.cumsum(q_lens, 0) - q_lens  # packed offset of each sequence's first new token
    q_rows = torch.arange(q_max)
    valid_q = q_rows[None, :] < q_lens[:, None]
    query_gather = torch.where(valid_q, starts[:, None] + q_rows[None, :], 0)
    query_scatter = (torch.arange(batch)[:, None] * q_max + q_rows[None, :])[valid_q]

    # Query row i of sequence b sits at absolute position (c - q + i) and sees keys 0..that position.
    # Padding rows see a superset (their output is discarded) so no row is fully masked.
    limit = (c_lens - q_lens)[:, None, None] + q_rows[None, :, None]
    attn_mask = (positions[None, None, :] <= limit).unsqueeze(1)

    new_positions = [pos for c, q in zip(context_lens, query_lens) for pos in range(c - q, c)]
    new_pos = torch.tensor(new_positions, dtype=torch.long)
    seq_of_token = torch.repeat_interleave(torch.arange(batch), q_lens)
    slot_mapping = tables[seq_of_token, new_pos // block_size] * block_size + new_pos % block_size

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return AttentionContext(
        kv_cache=kv_cache,
        slot_mapping=dev(slot_mapping),
        kv_gather=dev(kv_gather),
        query_gather=dev(query_gather),
        query_scatter=dev(query_scatter),
        attn_mask=dev(attn_mask),
    )

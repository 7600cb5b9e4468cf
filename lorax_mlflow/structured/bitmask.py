"""Token bitmasks: int32 [B, ceil(V/32)] rows, bit set = token allowed, applied to logits in place."""

from __future__ import annotations

import torch
import xgrammar as xgr


def allocate_token_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """A CPU int32 [batch_size, ceil(vocab_size/32)] bitmask with every token allowed."""
    return xgr.allocate_token_bitmask(batch_size, vocab_size)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None = None) -> None:
    """Set disallowed tokens of float `logits` [B, V] to -inf, in place, for the rows in `indices` (None: all).

    Rows not listed are untouched, so structured and free requests share one batch. The bitmask is
    copied to the logits' device when it lives elsewhere (xgrammar fills it on the CPU).
    """
    if indices is not None and len(indices) == 0:
        return
    vocab_size = logits.shape[-1]
    if bitmask.shape[-1] * 32 < vocab_size:
        raise ValueError(f"bitmask covers {bitmask.shape[-1] * 32} tokens but logits have {vocab_size}")
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=indices)

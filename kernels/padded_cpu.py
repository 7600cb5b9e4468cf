"""Batched LoRA for CPU steps with many small segments (decode batches).

The segment loop costs a few small ops per adapter per layer, and on a CPU, at decode batch
sizes, that per-op overhead dominates. Here all segments run at once, two batched matmuls applying
every segment's A and B:

- `uniform_add_lora`: when the segments tile one run of rows with one length each (the runner
  packs a step's rows by slot, so a decode step whose adapters have equally many sequences is
  this case), the batch is viewed as ``[segments, width, in]`` as it lies: two ops, no copies.
- `padded_add_lora`: otherwise each segment's tokens are gathered into a zero-padded
  ``[segments, max_tokens, in]`` block and one index_add writes the results back: five ops
  whatever the number of adapters. Padding rows are zero, so their (zero) results may safely be
  added to token 0. It pays off when the padding wastes less work than the ops it saves (see
  `prefer_padded`).
"""

from __future__ import annotations

import torch

from .meta import LoraBatchMeta

# Multiply-adds a CPU core does in the time of one small torch op (dispatch + launch), roughly.
_MACS_PER_OP = 2_000_000
_OPS_PER_SEGMENT = 3
_PADDED_OPS = 5


def prefer_padded(meta: LoraBatchMeta, rank: int, in_features: int, out_features: int) -> bool:
    if meta.device.type != "cpu" or meta.num_segments < 2:
        return False
    padded_rows = meta.num_segments * meta.max_segment_tokens
    wasted = (padded_rows - len(meta.sorted_token_indices)) * rank * (in_features + out_features)
    saved_ops = meta.num_segments * _OPS_PER_SEGMENT - _PADDED_OPS
    return wasted < saved_ops * _MACS_PER_OP


def padded_add_lora(
    y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, meta: LoraBatchMeta
) -> None:
    a = _active_slots(a_stack, meta)  # [G, r, in]
    b_t = _active_slots(b_stack.transpose(1, 2), meta)  # [G, r, out]: dense rows when B is stored rank-major
    segments, width = meta.num_segments, meta.max_segment_tokens
    rows = x.index_select(0, meta.padded_token_index).float() * meta.padded_valid
    v = torch.bmm(rows.view(segments, width, -1), a.float().transpose(1, 2))
    update = torch.bmm(v, b_t.float()).view(segments * width, -1)
    y.index_add_(0, meta.padded_token_index, update.to(y.dtype))


def uniform_add_lora(
    y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, meta: LoraBatchMeta
) -> None:
    rows, segments = meta.uniform_rows, meta.num_segments
    a = _active_slots(a_stack, meta)  # [G, r, in]
    b_t = _active_slots(b_stack.transpose(1, 2), meta)  # [G, r, out]
    v = torch.bmm(x[rows].reshape(segments, -1, x.shape[1]).float(), a.float().transpose(1, 2))
    y_segments = y[rows].view(segments, -1, y.shape[1])  # y is contiguous: updated in place
    if y.dtype == torch.float32:
        y_segments.baddbmm_(v, b_t.float())
    else:  # v and the update stay float32; y is rounded once
        y_segments.add_(torch.bmm(v, b_t.float()).to(y.dtype))


def _active_slots(stack: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """The stack restricted to this step's slots, in segment order (a view when they are 0..G-1)."""
    if meta.segment_slots_host == tuple(range(meta.num_segments)):
        return stack[: meta.num_segments]
    return stack.index_select(0, meta.segment_slots.long())

"""LoRA shrink/expand with plain torch ops: the CPU path (and the fallback wherever Triton is absent).

Per segment (one adapter slot and its tokens): gather the tokens, one matmul with that slot's A,
one with its B, scatter-add into y. A segment whose tokens form one contiguous run of the batch
(the usual case) uses slices instead of gather/scatter. Tokens without an adapter cost nothing.
v is float32 whatever the input dtype; fp16/bf16 operands are upcast per segment, so both
products accumulate in float32 and y is rounded once, when the update is added.
On CPU the cost is mostly per-op overhead, so `add_lora` (one slice) skips materialising v.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import LoraBatchMeta
from .padded_cpu import padded_add_lora, prefer_padded, uniform_add_lora
from .shapes import check_expand_args, check_shrink_args


def lora_shrink(x: torch.Tensor, a_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta) -> torch.Tensor:
    check_shrink_args(x, a_stacks, meta)
    rank = a_stacks[0].shape[1]
    v = torch.zeros(len(a_stacks), x.shape[0], rank, dtype=torch.float32, device=x.device)
    for segment, slot in enumerate(meta.segment_slots_host):
        rows = _segment_rows(meta, segment)
        x_rows = _gather(x, rows).float()
        for s, a_stack in enumerate(a_stacks):
            _scatter_copy(v[s], rows, x_rows @ a_stack[slot].float().T)
    return v


def lora_expand(
    v: torch.Tensor, b_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta, y: torch.Tensor
) -> None:
    widths = check_expand_args(v.shape, b_stacks, meta, y)
    offsets = [sum(widths[:s]) for s in range(len(widths))]
    y_slices = [y[:, offset : offset + width] for offset, width in zip(offsets, widths)]
    for segment, slot in enumerate(meta.segment_slots_host):
        rows = _segment_rows(meta, segment)
        for s, b_stack in enumerate(b_stacks):
            update = _gather(v[s], rows).float() @ b_stack[slot].float().T
            _scatter_add(y_slices[s], rows, update.to(y.dtype))


def add_lora(
    y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, meta: LoraBatchMeta
) -> None:
    check_shrink_args(x, [a_stack], meta)
    check_expand_args((1, meta.num_tokens, a_stack.shape[1]), [b_stack], meta, y)
    if meta.uniform_rows is not None and y.is_contiguous():
        uniform_add_lora(y, x, a_stack, b_stack, meta)
        return
    if prefer_padded(meta, a_stack.shape[1], a_stack.shape[2], b_stack.shape[1]):
        padded_add_lora(y, x, a_stack, b_stack, meta)
        return
    for segment, slot in enumerate(meta.segment_slots_host):
        rows = _segment_rows(meta, segment)
        v_rows = _gather(x, rows).float() @ a_stack[slot].float().T
        _scatter_add(y, rows, (v_rows @ b_stack[slot].float().T).to(y.dtype))


def _segment_rows(meta: LoraBatchMeta, segment: int) -> slice | torch.Tensor:
    """The segment's rows: a slice when they are one contiguous run, else an index tensor."""
    first = meta.segment_first_tokens[segment]
    if first >= 0:
        return slice(first, first + meta.segment_counts_host[segment])
    return meta.segment_tokens[segment]


def _gather(source: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return source[rows] if isinstance(rows, slice) else source.index_select(0, rows)


def _scatter_copy(target: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(rows, slice):
        target[rows] = values
    else:
        target.index_copy_(0, rows, values)


def _scatter_add(target: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(rows, slice):
        target[rows] += values
    else:
        target.index_add_(0, rows, values)

"""LoRA shrink/expand with plain torch ops: the CPU path (and the fallback wherever Triton is absent).

`lora_shrink` / `lora_expand` (several slices, the layout the Triton kernels share), per segment
(one adapter slot and its tokens): gather the tokens, one matmul with that slot's A, one with its B,
scatter-add into y; a segment whose tokens form one contiguous run uses slices instead.
`add_lora` (one slice, the CPU layout) works on runs of rows instead of segments, as
`run_plan.plan_runs` decides: long runs alone on slices, short runs in one batched pair.
Tokens without an adapter cost nothing. v is float32 whatever the input dtype; fp16/bf16 operands
are upcast, so both products accumulate in float32 and y is rounded once, when the update is added.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import LoraBatchMeta
from .batched_runs import batched_add_lora
from .run_plan import plan_runs
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
    plan = plan_runs(meta, a_stack.shape[1], a_stack.shape[2], b_stack.shape[1])
    for start, stop, slot in plan.singles:
        v_rows = x[start:stop].float() @ a_stack[slot].float().T
        y[start:stop] += (v_rows @ b_stack[slot].float().T).to(y.dtype)
    if plan.batched is not None:
        batched_add_lora(y, x, a_stack, b_stack, plan.batched)


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

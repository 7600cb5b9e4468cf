"""LoRA shrink/expand with plain torch ops: the CPU path (and the fallback wherever Triton is absent).

Per segment (one adapter slot and its tokens): gather the tokens, one matmul with that slot's A,
one with its B, scatter-add into y. A segment whose tokens form one contiguous run of the batch
(the usual case) uses slices instead of gather/scatter. Tokens without an adapter cost nothing.
v is float32 whatever the input dtype; fp16/bf16 operands are upcast per segment, so both
products accumulate in float32 and y is rounded once, when the update is added.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import LoraBatchMeta
from .shapes import check_expand_args, check_shrink_args


def lora_shrink(x: torch.Tensor, a_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta) -> torch.Tensor:
    check_shrink_args(x, a_stacks, meta)
    rank = a_stacks[0].shape[1]
    v = torch.zeros(len(a_stacks), x.shape[0], rank, dtype=torch.float32, device=x.device)
    for segment, slot in enumerate(meta.segment_slots_host):
        first = meta.segment_first_tokens[segment]
        if first >= 0:
            rows = slice(first, first + meta.segment_counts_host[segment])
            x_rows = x[rows].float()
            for s, a_stack in enumerate(a_stacks):
                torch.matmul(x_rows, a_stack[slot].float().T, out=v[s, rows])
        else:
            tokens = meta.segment_token_indices(segment)
            x_rows = x.index_select(0, tokens).float()
            for s, a_stack in enumerate(a_stacks):
                v[s].index_copy_(0, tokens, x_rows @ a_stack[slot].float().T)
    return v


def lora_expand(
    v: torch.Tensor, b_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta, y: torch.Tensor
) -> None:
    widths = check_expand_args(v, b_stacks, meta, y)
    offsets = [sum(widths[:s]) for s in range(len(widths))]
    for segment, slot in enumerate(meta.segment_slots_host):
        first = meta.segment_first_tokens[segment]
        tokens = meta.segment_token_indices(segment) if first < 0 else None
        rows = slice(first, first + meta.segment_counts_host[segment])
        for s, b_stack in enumerate(b_stacks):
            columns = slice(offsets[s], offsets[s] + widths[s])
            v_rows = v[s, rows] if tokens is None else v[s].index_select(0, tokens)
            update = (v_rows.float() @ b_stack[slot].float().T).to(y.dtype)
            if tokens is None:
                y[rows, columns] += update
            else:
                y[:, columns].index_add_(0, tokens, update)


def add_lora(
    y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, meta: LoraBatchMeta
) -> None:
    lora_expand(lora_shrink(x, [a_stack], meta), [b_stack], meta, y)

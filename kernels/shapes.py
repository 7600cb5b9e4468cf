"""Argument checks shared by both backends, so shape errors read the same whichever path runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .meta import LoraBatchMeta


def check_shrink_args(x: torch.Tensor, a_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, in], got shape {tuple(x.shape)}")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the meta was built for {meta.num_tokens}")
    if not a_stacks:
        raise ValueError("a_stacks must hold at least one slice")
    first = a_stacks[0]
    for a_stack in a_stacks:
        if a_stack.dim() != 3 or a_stack.shape != first.shape:
            raise ValueError(f"every A stack must be [slots, r, in] of one shape, got {[tuple(a.shape) for a in a_stacks]}")
        if a_stack.shape[2] != x.shape[1]:
            raise ValueError(f"A stack in_features {a_stack.shape[2]} != x in_features {x.shape[1]}")
        if a_stack.dtype != x.dtype or a_stack.device != x.device:
            raise ValueError(f"A stack is {a_stack.dtype} on {a_stack.device}, x is {x.dtype} on {x.device}")
    if first.shape[0] < meta.num_slots:
        raise ValueError(f"A stack has {first.shape[0]} slots but the meta addresses {meta.num_slots}")


def check_expand_args(
    v_shape: Sequence[int], b_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta, y: torch.Tensor
) -> list[int]:
    """Checks the operands of an expand from a v of shape v_shape; returns each slice's output width."""
    if len(v_shape) != 3 or v_shape[0] != len(b_stacks) or v_shape[1] != meta.num_tokens:
        raise ValueError(
            f"v must be [{len(b_stacks)} slices, {meta.num_tokens} tokens, r], got shape {tuple(v_shape)}"
        )
    if y.dim() != 2 or y.shape[0] != meta.num_tokens:
        raise ValueError(f"y must be [{meta.num_tokens} tokens, out], got shape {tuple(y.shape)}")
    widths = []
    for b_stack in b_stacks:
        if b_stack.dim() != 3 or b_stack.shape[2] != v_shape[2]:
            raise ValueError(f"every B stack must be [slots, out, r={v_shape[2]}], got {tuple(b_stack.shape)}")
        if b_stack.shape[0] < meta.num_slots:
            raise ValueError(f"B stack has {b_stack.shape[0]} slots but the meta addresses {meta.num_slots}")
        if b_stack.dtype != y.dtype or b_stack.device != y.device:
            raise ValueError(f"B stack is {b_stack.dtype} on {b_stack.device}, y is {y.dtype} on {y.device}")
        widths.append(b_stack.shape[1])
    if sum(widths) != y.shape[1]:
        raise ValueError(f"slice widths {widths} sum to {sum(widths)} but y has {y.shape[1]} columns")
    return widths

"""Obviously-correct references for the LoRA kernels: one token at a time, straight from the
definition, working on the raw token -> slot map (no grouping, no meta), optionally in float64.

Used only by tests and benchmarks to check the fast paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def reference_shrink(
    x: torch.Tensor,
    a_stacks: Sequence[torch.Tensor],
    token_lora: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """v[s, t] = A_s[slot(t)] @ x[t] for tokens with an adapter, 0 otherwise. Returns [S, T, r] in dtype."""
    num_tokens = x.shape[0]
    rank = a_stacks[0].shape[1]
    v = torch.zeros(len(a_stacks), num_tokens, rank, dtype=dtype)
    for t, slot in enumerate(token_lora.tolist()):
        if slot < 0:
            continue
        for s, a_stack in enumerate(a_stacks):
            v[s, t] = a_stack[slot].cpu().to(dtype) @ x[t].cpu().to(dtype)
    return v


def reference_expand(
    v: torch.Tensor,
    b_stacks: Sequence[torch.Tensor],
    token_lora: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Returns a copy of y (in dtype) with y[t, slice s columns] += B_s[slot(t)] @ v[s, t] added for
    tokens with an adapter; slices are packed side by side in y in the order of b_stacks."""
    out = y.detach().cpu().to(dtype).clone()
    for t, slot in enumerate(token_lora.tolist()):
        if slot < 0:
            continue
        offset = 0
        for s, b_stack in enumerate(b_stacks):
            width = b_stack.shape[1]
            out[t, offset : offset + width] += b_stack[slot].cpu().to(dtype) @ v[s, t].cpu().to(dtype)
            offset += width
    return out


def reference_add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    token_lora: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Returns y + B[slot(t)] @ A[slot(t)] @ x[t] per token with an adapter, computed in dtype."""
    v = reference_shrink(x, [a_stack], token_lora, dtype)
    return reference_expand(v, [b_stack], token_lora, y, dtype)

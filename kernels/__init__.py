"""Fused multi-adapter LoRA kernels (SGMV shrink/expand): Triton on CUDA, torch elsewhere.

    meta = make_lora_meta(token_lora, num_slots)       # once per step; None if no token has an adapter
    v = lora_shrink(x, [a_q, a_k, a_v], meta)          # [S, T, r] float32, 0 for no-adapter tokens
    lora_expand(v, [b_q, b_k, b_v], meta, y)           # y[:, slice s] += v[s] @ B_s[slot]^T, in place
    add_lora(y, x, a_stack, b_stack, meta)             # one slice: shrink then expand

A stacks are [slots, r, in], B stacks [slots, out, r], each slot zero-padded to the max rank r,
with the adapter's scaling already folded into B. x, A, B, y share one dtype (fp32/fp16/bf16);
v is always float32, so both products accumulate in float32 and y is rounded once.
Every function takes an optional `backend="auto"|"triton"|"torch"` (see dispatch.py). The Triton
shrink is deterministic and batch-invariant by default (configs.py; `set_deterministic(False)` or
LORAX_KERNELS_DETERMINISTIC=0 selects the batch-adaptive split-K with atomics).
A None meta means no token has an adapter: shrink returns zeros and expand leaves y as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .configs import DETERMINISTIC_ENV_VAR, is_deterministic, set_deterministic
from .dispatch import BACKEND_ENV_VAR, backend_module, resolve_backend
from .meta import LoraBatchMeta, make_lora_meta

__all__ = [
    "BACKEND_ENV_VAR",
    "DETERMINISTIC_ENV_VAR",
    "LoraBatchMeta",
    "add_lora",
    "is_deterministic",
    "lora_expand",
    "lora_shrink",
    "make_lora_meta",
    "resolve_backend",
    "set_deterministic",
]


def lora_shrink(
    x: torch.Tensor, a_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta | None, *, backend: str | None = None
) -> torch.Tensor:
    """v[s, t] = A_s[slot(t)] @ x[t] for tokens with an adapter, 0 for the others. Returns [S, T, r] float32."""
    if meta is None:
        return torch.zeros(len(a_stacks), x.shape[0], a_stacks[0].shape[1], dtype=torch.float32, device=x.device)
    return backend_module(x, backend).lora_shrink(x, a_stacks, meta)


def lora_expand(
    v: torch.Tensor,
    b_stacks: Sequence[torch.Tensor],
    meta: LoraBatchMeta | None,
    y: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """y[t, off_s : off_s + out_s] += v[s, t] @ B_s[slot(t)]^T in place, for tokens with an adapter;
    slices are packed side by side in y in the order of b_stacks."""
    if meta is None:
        return
    backend_module(y, backend).lora_expand(v, b_stacks, meta, y)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    meta: LoraBatchMeta | None,
    *,
    backend: str | None = None,
) -> None:
    """y[t] += B[slot(t)] @ A[slot(t)] @ x[t] in place, for tokens with an adapter."""
    if meta is None:
        return
    backend_module(y, backend).add_lora(y, x, a_stack, b_stack, meta)

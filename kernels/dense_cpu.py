"""Dense masked LoRA for small CPU batches (decode steps).

On a CPU the segment loop costs a few small ops per adapter per layer, and at decode batch sizes
that per-op overhead dominates. Here every slot's factors are laid out once as flat matrices
``A_flat [slots * r, in]`` and ``B_flat [slots * r, out]``, and one step is two matmuls and a mask:
``y += ((x @ A_flat.T) * onehot(slot)) @ B_flat``. It does ``slots`` times the multiply-adds of the
segment loop, so it only runs when that extra work is cheaper than the ops it saves.

The flat layouts are cached per weight tensor and rebuilt only when the slot weights change
(tensor version counter), i.e. when an adapter is placed in a slot, not on every forward.
"""

from __future__ import annotations

import weakref

import torch

from .meta import LoraBatchMeta

# Multiply-adds a CPU core does in the time of one small torch op (dispatch + launch), roughly.
_MACS_PER_OP = 2_000_000
_OPS_PER_SEGMENT = 3
_MAX_CACHED = 4096

_relayouts: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}


def prefer_dense(meta: LoraBatchMeta, rank: int, in_features: int, out_features: int) -> bool:
    """Dense wins when its wasted multiply-adds cost less than the segment loop's op overhead."""
    if meta.device.type != "cpu" or meta.num_segments < 2:
        return False
    wasted = meta.num_tokens * rank * (in_features + out_features) * (meta.num_slots - 1)
    return wasted < meta.num_segments * _OPS_PER_SEGMENT * _MACS_PER_OP


def dense_add_lora(
    y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, meta: LoraBatchMeta
) -> None:
    slots, rank, _ = a_stack.shape
    a_flat = _relayout(a_stack, "a")  # [slots * rank, in], row s * rank + k
    b_flat = _relayout(b_stack, "b")  # [slots * rank, out], row s * rank + k
    v = x.float() @ a_flat.T
    v = (v.view(-1, slots, rank) * meta.slot_onehot[:, :, None]).view(-1, slots * rank)
    y.addmm_(v.to(y.dtype), b_flat.to(y.dtype))


def _relayout(stack: torch.Tensor, kind: str) -> torch.Tensor:
    base = stack._base if stack._base is not None else stack
    key = (kind, stack.data_ptr(), tuple(stack.shape), tuple(stack.stride()))
    hit = _relayouts.get(key)
    if hit is not None and hit[0]() is base and hit[1] == stack._version:
        return hit[2]
    slots, rows, cols = stack.shape
    if kind == "a":
        flat = stack.reshape(slots * rows, cols).float().contiguous()
    else:  # B[s, out, k] -> row s * rank + k
        flat = stack.permute(0, 2, 1).reshape(slots * cols, rows).float().contiguous()
    if len(_relayouts) >= _MAX_CACHED:
        _relayouts.clear()
    _relayouts[key] = (weakref.ref(base), stack._version, flat)
    return flat

"""Triton SGMV kernels: LoRA shrink and expand over stacked slot weights, tokens grouped by slot.

Both kernels walk the segment table of a `LoraBatchMeta`: program axis 2 enumerates
(segment, slice) pairs, axis 0 blocks of the segment's tokens (read through the sorted token
indices, so a segment's tokens need not be contiguous in the batch). Tokens without an adapter
belong to no segment and are never touched. Several slices (e.g. q, k, v) run in one launch: their
weight base pointers, strides, output widths and column offsets travel as small int64 tables.

shrink: v[s, t, :r] = x[t] @ A_s[slot]^T, split-K over in_features. By default the split is fixed
by in_features and each split writes its partial sum to a workspace that `_sum_splits_kernel` adds
up in split order: a token's v is bit-identical whatever shares its batch (see configs.py; the
batch-adaptive split with float32 atomics remains as an option).
expand: y[t, off_s : off_s + out_s] += v[s, t] @ B_s[slot]^T, read-modify-write of y in place.
v is float32. Rank is padded to a power of two >= 16 and masked, so any rank works (4, 8, 48, 128).
Weight stacks [slots, r, in] / [slots, out, r] may be strided views (e.g. a rank slice of a
larger slot buffer) as long as their last dimension is dense; each slice's pointer and strides
travel in its row of the table.

Set TRITON_INTERPRET=1 before this module is imported to run the kernels on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .configs import expand_config, shrink_config
from .meta import LoraBatchMeta
from .shapes import check_expand_args, check_shrink_args


# Per-slice weight tables (int64, one row per slice): where each stack lives and how it is strided.
A_TABLE_COLUMNS: tl.constexpr = tl.constexpr(3)  # base pointer, slot stride, rank-row stride
B_TABLE_COLUMNS: tl.constexpr = tl.constexpr(5)  # base pointer, slot stride, out-row stride, out width, y column offset


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_table,
    out_ptr,
    sorted_tokens_ptr,
    segment_slots_ptr,
    segment_starts_ptr,
    segment_counts_ptr,
    in_features,
    k_per_split,
    rank,
    stride_xt,
    stride_xk,
    stride_os,
    stride_ot,
    stride_osplit,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUTPUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """OUTPUT: 0 = store into v rows by token; 1 = atomic-add into v rows by token;
    2 = store this split's partial into workspace[split, slice, sorted position]."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    segment = tl.program_id(2) // NUM_SLICES
    slice_id = tl.program_id(2) % NUM_SLICES
    count = tl.load(segment_counts_ptr + segment)
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(segment_starts_ptr + segment)
    slot = tl.load(segment_slots_ptr + segment).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = tl.load(sorted_tokens_ptr + start + offs_m, mask=mask_m, other=0)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < rank
    a_entry = a_table + slice_id * A_TABLE_COLUMNS
    stride_ar = tl.load(a_entry + 2)
    a_base = tl.load(a_entry).to(tl.pointer_type(x_ptr.dtype.element_ty)) + slot * tl.load(a_entry + 1)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, in_features)
    for k0 in range(k_begin, k_end, BLOCK_K):  # one contiguous range per split, in order
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x_tile = tl.load(
            x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        a_tile = tl.load(  # A[slot] is [r, in] row-major; load its transpose [BLOCK_K, BLOCK_N]
            a_base + offs_n[None, :] * stride_ar + offs_k[:, None],
            mask=mask_n[None, :] & mask_k[:, None],
            other=0.0,
        )
        acc += tl.dot(x_tile, a_tile, input_precision=DOT_PRECISION)

    out_mask = mask_m[:, None] & mask_n[None, :]
    if OUTPUT == 2:
        rows = start + offs_m
        partial_ptrs = out_ptr + pid_k * stride_osplit + slice_id * stride_os + rows[:, None] * stride_ot + offs_n[None, :]
        tl.store(partial_ptrs, acc, mask=out_mask)
    else:
        v_ptrs = out_ptr + slice_id * stride_os + tokens[:, None] * stride_ot + offs_n[None, :]
        if OUTPUT == 1:
            tl.atomic_add(v_ptrs, acc, mask=out_mask)
        else:
            tl.store(v_ptrs, acc, mask=out_mask)


@triton.jit
def _sum_splits_kernel(
    partials_ptr,
    v_ptr,
    token_positions_ptr,
    num_tokens,
    rank,
    stride_psplit,
    stride_ps,
    stride_pn,
    stride_vs,
    stride_vt,
    SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """v[s, t] = sum over splits, in split order, of the partials at t's sorted position; 0 for
    tokens without an adapter. Writes every row of v, so v needs no zero-fill."""
    slice_id = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < num_tokens
    positions = tl.load(token_positions_ptr + offs_t, mask=mask_t, other=-1)
    has_adapter = positions >= 0
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    load_mask = has_adapter[:, None] & mask_r[None, :]
    base = partials_ptr + slice_id * stride_ps + positions[:, None] * stride_pn + offs_r[None, :]
    total = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        total += tl.load(base + split * stride_psplit, mask=load_mask, other=0.0)
    v_ptrs = v_ptr + slice_id * stride_vs + offs_t[:, None] * stride_vt + offs_r[None, :]
    tl.store(v_ptrs, total, mask=mask_t[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    v_ptr,
    b_table,
    y_ptr,
    sorted_tokens_ptr,
    segment_slots_ptr,
    segment_starts_ptr,
    segment_counts_ptr,
    rank,
    stride_vs,
    stride_vt,
    stride_yt,
    stride_yn,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    segment = tl.program_id(2) // NUM_SLICES
    slice_id = tl.program_id(2) % NUM_SLICES
    count = tl.load(segment_counts_ptr + segment)
    b_entry = b_table + slice_id * B_TABLE_COLUMNS
    out_width = tl.load(b_entry + 3)
    if (pid_m * BLOCK_M >= count) | (pid_n * BLOCK_N >= out_width):
        return
    start = tl.load(segment_starts_ptr + segment)
    slot = tl.load(segment_slots_ptr + segment).to(tl.int64)
    out_offset = tl.load(b_entry + 4)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = tl.load(sorted_tokens_ptr + start + offs_m, mask=mask_m, other=0)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < rank
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_width

    v_tile = tl.load(
        v_ptr + slice_id * stride_vs + tokens[:, None] * stride_vt + offs_k[None, :],
        mask=mask_m[:, None] & mask_k[None, :],
        other=0.0,
    )
    # B[slot] is [out_width, rank] with unit stride along rank; load its transpose [BLOCK_K, BLOCK_N].
    stride_bn = tl.load(b_entry + 2)
    b_base = tl.load(b_entry).to(tl.pointer_type(y_ptr.dtype.element_ty)) + slot * tl.load(b_entry + 1)
    b_tile = tl.load(
        b_base + offs_n[None, :] * stride_bn + offs_k[:, None],
        mask=mask_n[None, :] & mask_k[:, None],
        other=0.0,
    )
    update = tl.dot(v_tile, b_tile.to(tl.float32), input_precision=DOT_PRECISION)

    y_ptrs = y_ptr + tokens[:, None] * stride_yt + (out_offset + offs_n)[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    y_tile = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y_tile.to(tl.float32) + update).to(y_ptr.dtype.element_ty), mask=y_mask)


def lora_shrink(x: torch.Tensor, a_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta) -> torch.Tensor:
    check_shrink_args(x, a_stacks, meta)
    _check_meta_device(meta, x)
    _check_unit_inner_stride(a_stacks, "A")
    num_slices = len(a_stacks)
    _, rank, in_features = a_stacks[0].shape
    num_tokens = x.shape[0]
    config = shrink_config(meta.segment_counts_host, num_slices, rank, in_features, x.element_size())
    fixed_order_sum = config.split_k > 1 and not config.atomic
    if fixed_order_sum:
        v = torch.empty(num_slices, num_tokens, rank, dtype=torch.float32, device=x.device)
        out = torch.empty(config.split_k, num_slices, len(meta.sorted_token_indices), rank, dtype=torch.float32, device=x.device)
        out_strides = (out.stride(1), out.stride(2), out.stride(0))
        output_mode = 2
    else:
        v = out = torch.zeros(num_slices, num_tokens, rank, dtype=torch.float32, device=x.device)
        out_strides = (v.stride(0), v.stride(1), 0)
        output_mode = 1 if config.atomic else 0
    grid = (triton.cdiv(meta.max_segment_tokens, config.block_m), config.split_k, meta.num_segments * num_slices)
    _shrink_kernel[grid](
        x,
        _int64_table(tuple((a.data_ptr(), a.stride(0), a.stride(1)) for a in a_stacks), x.device),
        out,
        meta.sorted_token_indices,
        meta.segment_slots,
        meta.segment_starts,
        meta.segment_counts,
        in_features,
        config.k_per_split,
        rank,
        x.stride(0),
        x.stride(1),
        *out_strides,
        NUM_SLICES=num_slices,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        OUTPUT=output_mode,
        DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if fixed_order_sum:
        block_t = 32
        _sum_splits_kernel[(triton.cdiv(num_tokens, block_t), num_slices)](
            out,
            v,
            meta.token_positions,
            num_tokens,
            rank,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            v.stride(0),
            v.stride(1),
            SPLIT_K=config.split_k,
            BLOCK_T=block_t,
            BLOCK_R=config.block_n,
        )
    return v


def lora_expand(
    v: torch.Tensor, b_stacks: Sequence[torch.Tensor], meta: LoraBatchMeta, y: torch.Tensor
) -> None:
    widths = check_expand_args(v.shape, b_stacks, meta, y)
    _check_meta_device(meta, y)
    _check_unit_inner_stride(b_stacks, "B")
    if v.dtype != torch.float32 or v.stride(2) != 1:
        v = v.float().contiguous()
    num_slices = len(b_stacks)
    rank = v.shape[2]
    config = expand_config(meta.max_segment_tokens, rank, max(widths))
    offsets = [sum(widths[:s]) for s in range(num_slices)]
    grid = (
        triton.cdiv(meta.max_segment_tokens, config.block_m),
        triton.cdiv(max(widths), config.block_n),
        meta.num_segments * num_slices,
    )
    _expand_kernel[grid](
        v,
        _int64_table(
            tuple((b.data_ptr(), b.stride(0), b.stride(1), width, offset) for b, width, offset in zip(b_stacks, widths, offsets)),
            y.device,
        ),
        y,
        meta.sorted_token_indices,
        meta.segment_slots,
        meta.segment_starts,
        meta.segment_counts,
        rank,
        v.stride(0),
        v.stride(1),
        y.stride(0),
        y.stride(1),
        NUM_SLICES=num_slices,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        DOT_PRECISION=_dot_precision(y.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def add_lora(
    y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, meta: LoraBatchMeta
) -> None:
    lora_expand(lora_shrink(x, [a_stack], meta), [b_stack], meta, y)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 weights get exact fp32 products; fp16/bf16 weights: their fp32 products (expand) may use
    tf32, whose mantissa is as wide as fp16's, at tensor-core speed."""
    return "ieee" if dtype == torch.float32 else "tf32"


_table_cache: dict[tuple, torch.Tensor] = {}
_TABLE_CACHE_SIZE = 1024


def _int64_table(rows: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """A per-slice weight table on the device, cached by content: slot buffers live for the whole
    run, so after the first step each layer finds its table without a host->device copy."""
    key = (rows, device)
    table = _table_cache.get(key)
    if table is None:
        if len(_table_cache) >= _TABLE_CACHE_SIZE:
            _table_cache.clear()
        table = torch.tensor(rows, dtype=torch.int64, device=device)
        _table_cache[key] = table
    return table


def _check_unit_inner_stride(stacks: Sequence[torch.Tensor], name: str) -> None:
    """Slot and row strides are free (a rank-sliced view of a larger buffer is fine); the last
    dimension must be dense."""
    if any(stack.stride(2) != 1 for stack in stacks):
        raise ValueError(f"the Triton kernels need {name} stacks with unit stride in the last dimension")


def _check_meta_device(meta: LoraBatchMeta, tensor: torch.Tensor) -> None:
    if meta.device != tensor.device:
        raise ValueError(
            f"meta index tensors are on {meta.device} but the operands are on {tensor.device}; "
            "build the meta with make_lora_meta(..., device=<model device>)"
        )

"""Paged attention plugged into transformers' own modelling code.

Registered under the name ``lorax_paged`` with ``AttentionInterface`` (and a mask function that
returns None, since masking is done here from the step context). Each step is ONE packed forward
(``input_ids [1, T]``); this function writes the step's new K/V into the paged cache and attends,
so that the work is the sum over sequences of new tokens x context, never batch x longest x longest:

- decode rows (one new token each): one SDPA call per group of rows of similar context length,
  read block by block from the cache; the query heads that share a KV head are folded into query
  rows, so no KV head is repeated and no GQA flag is needed;
- a prefill chunk that is its sequence's whole context: causal SDPA over its own new keys (the
  cache is only written);
- a prefill chunk after cached tokens: SDPA over its context blocks with the step's prebuilt
  bottom-right causal mask, query heads folded the same way.

No call uses ``enable_gqa``, so every one of them is eligible for the flash or memory-efficient
kernels on CUDA, in any dtype; on CUDA the math kernel is excluded outright (a shape the fused
kernels refuse raises instead of silently materialising the whole score tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lorax_mlflow.engine.context import AttentionContext, current_attention_context

ATTENTION_NAME = "lorax_paged"
_FUSED_CUDA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query ``[1, Hq, T, D]``, key/value ``[1, Hkv, T, D]`` -> output ``[1, T, Hq, D]``."""
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise NotImplementedError("lorax paged attention does not support sliding windows or softcapping yet")
    ctx = current_attention_context()
    k_cache, v_cache = ctx.kv_cache[module.layer_idx]
    new_k = key[0].transpose(0, 1).to(k_cache.dtype)  # [T, Hkv, D]
    new_v = value[0].transpose(0, 1).to(v_cache.dtype)
    k_cache.index_copy_(0, ctx.slot_mapping, new_k)
    v_cache.index_copy_(0, ctx.slot_mapping, new_v)

    q = query[0].transpose(0, 1)  # [T, Hq, D]
    if query.is_cuda:
        with sdpa_kernel(_FUSED_CUDA_KERNELS):
            out = _attend(ctx, q, new_k, new_v, k_cache, v_cache, scaling)
    else:
        out = _attend(ctx, q, new_k, new_v, k_cache, v_cache, scaling)
    return out.unsqueeze(0), None


def _attend(
    ctx: AttentionContext,
    q: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    k_blocks = k_cache.view(-1, ctx.block_size, num_kv_heads, head_dim)
    v_blocks = v_cache.view(-1, ctx.block_size, num_kv_heads, head_dim)
    out = q.new_empty(num_tokens, num_q_heads, head_dim)

    for rows in ctx.decodes.groups if ctx.decodes is not None else ():
        n = rows.block_tables.shape[0]
        k = _gather_blocks(k_blocks, rows.block_tables).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)  # [n, Hkv, L, D]
        v = _gather_blocks(v_blocks, rows.block_tables).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
        folded = q[rows.rows].reshape(n, num_kv_heads, group, head_dim)
        attended = F.scaled_dot_product_attention(
            folded, k.to(q.dtype), v.to(q.dtype), attn_mask=rows.key_mask, scale=scale
        )
        out[rows.rows] = attended.reshape(n, num_q_heads, head_dim)

    for chunk in ctx.chunks:
        span = slice(chunk.start, chunk.start + chunk.num_tokens)
        if chunk.block_table is None:  # the whole context is new: plain causal attention over it
            k = new_k[span].to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, n, D]
            v = new_v[span].to(q.dtype).transpose(0, 1).repeat_interleave(group, dim=0)
            attended = F.scaled_dot_product_attention(
                q[span].transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, scale=scale
            )
            out[span] = attended[0].transpose(0, 1)
            continue
        k = _gather_blocks(k_blocks, chunk.block_table).view(-1, num_kv_heads, head_dim).transpose(0, 1)  # [Hkv, blocks * size, D]
        v = _gather_blocks(v_blocks, chunk.block_table).view(-1, num_kv_heads, head_dim).transpose(0, 1)
        n = chunk.num_tokens
        folded = q[span].reshape(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * n, head_dim)
        attended = F.scaled_dot_product_attention(
            folded.unsqueeze(0), k.to(q.dtype).unsqueeze(0), v.to(q.dtype).unsqueeze(0),
            attn_mask=chunk.folded_mask, scale=scale,
        )  # [1, Hkv, group * n, D], rows (g, i)
        out[span] = attended[0].reshape(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_q_heads, head_dim)
    return out


def _gather_blocks(blocks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``blocks[table]`` (whole cache blocks, in table order) through index_select: one contiguous copy
    per block, where advanced indexing walks element by element (3-4x slower on CPU for a decode
    step's tables, measured)."""
    return blocks.index_select(0, table.reshape(-1)).view(*table.shape, *blocks.shape[1:])


def _no_mask(*args, **kwargs) -> None:
    return None


def register_paged_attention() -> str:
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME

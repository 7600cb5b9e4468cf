"""Paged attention plugged into transformers' own modelling code.

Registered under the name ``lorax_paged`` with ``AttentionInterface`` (and a mask function that
returns None, since masking is done here from the step context). Each step is ONE packed forward
(``input_ids [1, T]``); this function writes the step's new K/V into the paged cache, gathers each
sequence's context, and attends per sequence with one padded SDPA call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lorax_mlflow.engine.context import current_attention_context

ATTENTION_NAME = "lorax_paged"


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
    num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
    k_cache.index_copy_(0, ctx.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, ctx.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))

    q = query[0].transpose(0, 1)[ctx.query_gather].transpose(1, 2)  # [B, Hq, Qmax, D]
    k = k_cache[ctx.kv_gather].transpose(1, 2)  # [B, Hkv, Lmax, D]
    v = v_cache[ctx.kv_gather].transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=ctx.attn_mask, scale=scaling,
        enable_gqa=num_q_heads != num_kv_heads,
    )
    out = out.transpose(1, 2).reshape(-1, num_q_heads, out.shape[-1])[ctx.query_scatter]
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs) -> None:
    return None


def register_paged_attention() -> str:
    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME

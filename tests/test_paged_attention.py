"""The paged attention of one mixed step (decode rows, a chunk after cached tokens, a fresh prefill)
equals transformers' own eager attention run on each sequence alone."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from lorax_mlflow.engine.attention import paged_attention_forward
from lorax_mlflow.engine.context import attention_context, build_attention_context

BLOCK = 4
HEAD_DIM = 8


class Layer(torch.nn.Module):
    """What the attention function reads off transformers' attention module."""

    def __init__(self, layer_idx: int, num_q_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_key_value_groups = num_q_heads // num_kv_heads


def hf_attention(layer, q, k, v, scale):
    """q [Hq, n, D] at the last n positions of k/v [Hkv, L, D]; bottom-right causal, as HF attends."""
    n, length = q.shape[1], k.shape[1]
    visible = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    mask = torch.zeros(n, length).masked_fill(~visible, float("-inf"))[None, None]
    out, _ = eager_attention_forward(layer, q[None], k[None], v[None], mask, scaling=scale)
    return out[0]  # [n, Hq, D]


MIXED_STEP = [(36, 1), (4, 1), (20, 9), (0, 12), (7, 1)]
"""(tokens already cached, new tokens): decode rows of 10 and 2 blocks (two length groups), a chunk
after cached tokens, a fresh prefill."""
LONG_DECODE_BESIDE_SHORT = [(3, 1), (150, 1), (5, 1), (30, 1), (2, 1), (6, 1), (33, 4)]
"""Decode rows of 1, 2, 8, 9 and 38 blocks: one long conversation among short ones, three groups."""
ALIKE_DECODES = [(9, 1), (12, 1), (10, 1), (0, 5)]
"""Decode rows of similar length: one group, attended in packed order."""


@pytest.mark.parametrize("sequences", [MIXED_STEP, LONG_DECODE_BESIDE_SHORT, ALIKE_DECODES])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(6, 2), (4, 4), (8, 1)])
def test_mixed_step_attention_equals_per_sequence_hf_attention(num_q_heads, num_kv_heads, sequences):
    torch.manual_seed(0)
    sequences = sorted(sequences, key=lambda s: s[1] > 1)  # one-token rows first, as the runner packs them
    num_blocks = 80
    kv_cache = torch.zeros(2, 2, num_blocks * BLOCK, num_kv_heads, HEAD_DIM)
    free = torch.randperm(num_blocks).tolist()  # scattered, out-of-order blocks
    tables, full = [], []
    for cached, new in sequences:
        length = cached + new
        tables.append([free.pop() for _ in range(-(-length // BLOCK))])
        full.append((torch.randn(num_q_heads, length, HEAD_DIM), torch.randn(num_kv_heads, length, HEAD_DIM),
                     torch.randn(num_kv_heads, length, HEAD_DIM)))
    layer = Layer(1, num_q_heads, num_kv_heads)
    for table, (cached, _), (_, k, v) in zip(tables, sequences, full):  # earlier steps' K/V
        for p in range(cached):
            slot = table[p // BLOCK] * BLOCK + p % BLOCK
            kv_cache[1, 0, slot], kv_cache[1, 1, slot] = k[:, p], v[:, p]

    query = torch.cat([q[:, c:] for (c, _), (q, _, _) in zip(sequences, full)], dim=1)[None]
    key = torch.cat([k[:, c:] for (c, _), (_, k, _) in zip(sequences, full)], dim=1)[None]
    value = torch.cat([v[:, c:] for (c, _), (_, _, v) in zip(sequences, full)], dim=1)[None]
    context = build_attention_context(kv_cache, tables, [c + n for c, n in sequences], [n for _, n in sequences],
                                      BLOCK, num_q_heads // num_kv_heads, torch.device("cpu"))
    with attention_context(context):
        out, _ = paged_attention_forward(layer, query, key, value, None, scaling=0.3)

    start = 0
    for (cached, new), (q, k, v) in zip(sequences, full):
        expected = hf_attention(layer, q[:, cached:], k, v, 0.3)
        torch.testing.assert_close(out[0, start : start + new], expected, atol=1e-5, rtol=1e-5)
        start += new
    for table, (cached, new), (_, k, _) in zip(tables, sequences, full):  # new K/V written to their slots
        slot = table[(cached + new - 1) // BLOCK] * BLOCK + (cached + new - 1) % BLOCK
        torch.testing.assert_close(kv_cache[1, 0, slot], k[:, -1])
    assert kv_cache[0].abs().sum() == 0, "other layers' cache untouched"


def test_decode_rows_are_grouped_by_context_length():
    """A long context among short ones gets its own group: the short rows do not pad to it."""
    kv_cache = torch.zeros(1, 2, 64 * BLOCK, 1, HEAD_DIM)
    tables = [[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [21, 22]]
    context = build_attention_context(kv_cache, tables, [3, 80, 6], [1, 1, 1], BLOCK, 1, torch.device("cpu"))
    groups = context.decodes.groups
    assert [g.rows.tolist() for g in groups] == [[0, 2], [1]]
    assert [g.block_tables.shape[1] for g in groups] == [2, 20]

    alike = build_attention_context(kv_cache, [[0, 1], [2], [3, 4]], [6, 2, 7], [1, 1, 1], BLOCK, 1,
                                    torch.device("cpu"))
    assert [g.rows for g in alike.decodes.groups] == [slice(0, 3)]


def test_one_token_rows_must_come_first():
    kv_cache = torch.zeros(1, 2, 8 * BLOCK, 1, HEAD_DIM)
    with pytest.raises(ValueError, match="packed before"):
        build_attention_context(kv_cache, [[0, 1], [2]], [6, 2], [5, 1], BLOCK, 1, torch.device("cpu"))

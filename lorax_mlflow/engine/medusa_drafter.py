"""Medusa drafting: top-1 chains from each row's own Medusa heads, batched per set of heads.

Rows of one step may use different heads (a per-request Medusa adapter, or the engine's default
one). Each distinct set runs its residual blocks over its own rows; every head output then goes
through one lm_head matmul for the whole step (heads with their own output projection use it
instead). Head ``k`` at the hidden state of position ``t`` proposes the token at ``t + k + 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorax_mlflow.lora.weights import MedusaHeads


def medusa_hidden(x: torch.Tensor, heads: MedusaHeads, num_heads: int) -> torch.Tensor:
    """[N, hidden] -> [N, num_heads, hidden]: the first `num_heads` heads' residual blocks applied to `x`."""
    out = x[:, None, :].expand(-1, num_heads, -1)
    for layer in range(heads.num_layers):
        w = heads.linear_w[:num_heads, layer].to(x.dtype)  # [K, hidden, hidden]
        b = heads.linear_b[:num_heads, layer].to(x.dtype)
        out = out + torch.nn.functional.silu(torch.einsum("nkh,kdh->nkd", out, w) + b)
    return out


@torch.inference_mode()
def draft_medusa(
    hidden: torch.Tensor,
    heads_per_row: Sequence[MedusaHeads],
    num_tokens: Sequence[int],
    lm_head: torch.Tensor,
) -> list[list[int]]:
    """Each row's top-1 draft chain: `num_tokens[i]` tokens from `heads_per_row[i]` at `hidden[i]`.

    hidden [N, hidden_size]: the last hidden state (after the final norm) of each row's last accepted
    token. lm_head [vocab, hidden_size]: the base model's output projection, cut to the tokens the
    sampler can emit (a padded vocabulary's extra rows are never drafted).
    """
    drafts: list[list[int]] = [[] for _ in heads_per_row]
    groups: dict[int, list[int]] = {}
    for row, heads in enumerate(heads_per_row):
        if num_tokens[row] > 0:
            groups.setdefault(id(heads), []).append(row)
    shared_rows: list[int] = []
    shared_limits: list[int] = []
    shared_states: list[torch.Tensor] = []
    for rows in groups.values():
        heads = heads_per_row[rows[0]]
        k = min(max(num_tokens[row] for row in rows), heads.num_heads)
        states = medusa_hidden(hidden[rows], heads, k)  # [R, k, hidden]
        if heads.out_w is not None:
            out_w = heads.out_w[:k, : lm_head.shape[0]].to(states.dtype)  # only tokens the sampler can emit
            tokens = torch.einsum("rkh,kvh->rkv", states, out_w).argmax(dim=-1)
            _take(drafts, rows, tokens.tolist(), [min(num_tokens[row], k) for row in rows])
        else:
            shared_rows.extend(rows)
            shared_limits.extend(min(num_tokens[row], k) for row in rows)
            shared_states.append(states.reshape(len(rows), k, -1))
    if shared_states:
        k_max = max(s.shape[1] for s in shared_states)
        padded = torch.cat([torch.nn.functional.pad(s, (0, 0, 0, k_max - s.shape[1])) for s in shared_states])
        tokens = (padded @ lm_head.T.to(padded.dtype)).argmax(dim=-1)  # one matmul for every head of the step
        _take(drafts, shared_rows, tokens.tolist(), shared_limits)
    return drafts


def _take(drafts: list[list[int]], rows: list[int], tokens: list[list[int]], limits: list[int]) -> None:
    for row, chain, limit in zip(rows, tokens, limits):
        drafts[row] = chain[:limit]

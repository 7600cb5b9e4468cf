"""Batched logits transformations used by the sampler.

Every function works on a whole batch at once: per-row parameters arrive as tensors of shape [B]
(or [B, V] for token statistics) so one step costs a fixed number of tensor ops whatever the
batch holds. Functions ending in `_` modify `logits` in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


def token_count_matrix(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """How often each vocabulary token occurs in each row's list, as float32 [B, vocab_size].

    The lists are padded with the out-of-vocabulary id `vocab_size`, scattered into [B, V + 1]
    and the padding column is dropped, so ragged lists cost one scatter.
    """
    batch = len(token_lists)
    max_len = max((len(tokens) for tokens in token_lists), default=0)
    counts = torch.zeros(batch, vocab_size + 1, dtype=torch.float32, device=device)
    if max_len:
        padded = torch.tensor(
            [list(tokens) + [vocab_size] * (max_len - len(tokens)) for tokens in token_lists],
            dtype=torch.int64,
        ).to(device, non_blocking=True)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab_size]


def apply_repetition_penalty_(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """HF/vLLM rule on tokens where `seen` [B, V] is true: positive logits / penalty, negative * penalty."""
    factor = torch.where(seen, penalty[:, None], torch.ones_like(logits))
    logits.copy_(torch.where(logits > 0, logits / factor, logits * factor))


def apply_frequency_presence_penalties_(
    logits: torch.Tensor, output_counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> None:
    """OpenAI rule: subtract count * frequency_penalty, and presence_penalty once if the token occurred."""
    logits -= output_counts * frequency[:, None] + (output_counts > 0).to(logits.dtype) * presence[:, None]


def truncate_sorted_(
    sorted_logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    typical_p: torch.Tensor | None,
) -> None:
    """Apply top-k, top-p, min-p then typical-p to logits sorted in descending order per row.

    Each filter sets the logits it drops to -inf and the next filter sees the renormalised
    survivors (as chained HF warpers do). A filter given as None is off for every row; per row,
    top_k >= V, top_p == 1, min_p == 0 and typical_p == 1 mean off. Every filter keeps at least one
    token, so a row never loses all its candidates here.
    """
    vocab = sorted_logits.shape[-1]
    if top_k is not None:
        ranks = torch.arange(vocab, device=sorted_logits.device)
        sorted_logits.masked_fill_(ranks[None, :] >= top_k[:, None], NEG_INF)
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        drop[:, 0] = False
        sorted_logits.masked_fill_(drop, NEG_INF)
    if min_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        sorted_logits.masked_fill_(probs < min_p[:, None] * probs[:, :1], NEG_INF)
    if typical_p is not None:
        sorted_logits.masked_fill_(~typical_keep_mask(sorted_logits, typical_p), NEG_INF)


def typical_keep_mask(logits: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.; HF `TypicalLogitsWarper`, used by LoRAX).

    Tokens are ranked by |-log p - H| (distance of their surprisal from the entropy H); the
    smallest prefix of that ranking holding at least `typical_p` of the mass is kept, ties on
    the boundary included. Rows with typical_p == 1 keep everything.
    """
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    sorted_distance, order = torch.sort(distance, dim=-1)
    cumulative = probs.gather(-1, order).cumsum(dim=-1)
    last = (cumulative < typical_p[:, None]).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    keep = distance <= sorted_distance.gather(-1, last)
    return keep | (typical_p[:, None] >= 1.0)

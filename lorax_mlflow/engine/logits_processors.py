"""Batched logits transformations used by the sampler.

Every function works on a whole batch at once: per-row parameters arrive as tensors of shape [B]
so one step costs a fixed number of tensor ops whatever the batch holds. Token statistics are
sparse: the distinct (row, token) pairs a batch has seen, never a dense [B, V] matrix. Functions
ending in `_` modify `logits` in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import torch

NEG_INF = float("-inf")


def seen_tokens(
    prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each distinct (row, token) pair of `prompts[i]` and `outputs[i]` (row i), as int64 `rows` and
    `tokens`, with float32 `output_counts` (how often the token occurs in that row's output; 0 for
    prompt-only tokens). Ids outside [0, vocab_size) are ignored."""
    lists = [*prompts, *outputs]
    flat = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.int64)
    list_index = torch.repeat_interleave(torch.tensor([len(tokens) for tokens in lists]))
    from_output = list_index >= len(prompts)
    in_vocab = (flat >= 0) & (flat < vocab_size)
    keys = (list_index % len(prompts)) * vocab_size + flat
    pairs, pair_index = torch.unique(keys[in_vocab], return_inverse=True)
    output_counts = torch.zeros(len(pairs)).index_add_(0, pair_index, from_output[in_vocab].float())
    pairs = pairs.to(device, non_blocking=True)
    return pairs // vocab_size, pairs % vocab_size, output_counts.to(device, non_blocking=True)


def apply_repetition_penalty_(
    logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, penalty: torch.Tensor
) -> None:
    """HF/vLLM rule at the distinct (rows, tokens) pairs: positive logits / penalty, negative * penalty."""
    values = logits[rows, tokens]
    factor = penalty[rows]
    logits[rows, tokens] = torch.where(values > 0, values / factor, values * factor)


def apply_frequency_presence_penalties_(
    logits: torch.Tensor,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    output_counts: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> None:
    """OpenAI rule at the distinct (rows, tokens) pairs: subtract output_count * frequency_penalty,
    and presence_penalty once if the token occurred in the output."""
    present = (output_counts > 0).to(logits.dtype)
    logits[rows, tokens] -= output_counts * frequency[rows] + present * presence[rows]


def truncate_sorted_(
    sorted_logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    min_p: torch.Tensor | None,
    typical_p: torch.Tensor | None,
) -> None:
    """Apply top-k, top-p, min-p then typical-p to logits sorted in descending order per row.

    `sorted_logits` [B, C] may be the whole sorted vocabulary or only its C best tokens, as long
    as every token a filter could keep is among them (top_k <= C for every row): the dropped tail
    has probability zero either way. Each filter sets the logits it drops to -inf and the next
    filter sees the renormalised survivors (as chained HF warpers do). A filter given as None is
    off for every row; per row, top_k >= C, top_p == 1, min_p == 0 and typical_p == 1 mean off.
    Every filter keeps at least one token, so a row never loses all its candidates here.
    """
    width = sorted_logits.shape[-1]
    if top_k is not None:
        ranks = torch.arange(width, device=sorted_logits.device)
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

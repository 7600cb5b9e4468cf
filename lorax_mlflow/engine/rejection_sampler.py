"""Speculative rejection sampling: accept draft tokens so that the output keeps the target distribution.

Draft token ``d`` at position ``j`` is accepted with probability ``min(1, p_j(d) / q_j(d))``, where
``p_j`` is the target's (the sampler's processed) distribution and ``q_j`` the drafter's. At the first
rejection the token is drawn instead from the residual ``max(p_j - q_j, 0)`` (renormalised); when every
draft is accepted a bonus token is drawn from ``p_K``. Each emitted token is then distributed exactly as
the target would have drawn it (Leviathan et al. 2023, Chen et al. 2023). Medusa top-1 chains and prompt
lookup are deterministic drafters: ``q_j`` is one-hot at ``d``, so ``d`` is accepted with probability
``p_j(d)`` and the residual is ``p_j`` without ``d``. Greedy rows (one-hot ``p``) accept exactly the
drafts equal to the target's argmax and then emit the argmax: greedy output is unchanged by speculation.

A seeded row draws only from its own generator, always ``num_drafts + vocab`` values (uniforms for its
drafts, one exponential race over the vocabulary), so it gets the same tokens whatever shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class RejectionOutput:
    token_ids: torch.Tensor
    """int64 [B, K + 1]: the accepted drafts then one drawn token; -1 after a row's emitted tokens."""
    num_accepted: torch.Tensor
    """int64 [B]: drafts accepted per row; the row emits num_accepted + 1 tokens."""


def rejection_sample(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    shared_generator: torch.Generator,
    draft_probs: torch.Tensor | None = None,
) -> RejectionOutput:
    """Verify the drafts of B rows at once.

    target_probs float32 [B, K + 1, V]: the target distribution after each row's prefix and each of its
    first drafts (rows with fewer than K drafts ignore the positions past ``num_drafts + 1``).
    draft_ids int64 [B, K]: drafts, any value past ``num_drafts``. num_drafts int64 [B].
    draft_probs float32 [B, K, V] or None for deterministic drafters (one-hot at the draft).
    generators: per row, its own generator (seeded) or None (draws from `shared_generator`).
    """
    batch, positions, vocab = target_probs.shape
    k = positions - 1
    device = target_probs.device
    uniforms, races = _draws(batch, k, vocab, num_drafts.tolist(), generators, shared_generator, device)

    valid = torch.arange(k, device=device)[None, :] < num_drafts[:, None]
    safe_drafts = torch.where(valid, draft_ids, 0)
    p_draft = target_probs[:, :k].gather(-1, safe_drafts[..., None])[..., 0]
    q_draft = torch.ones_like(p_draft) if draft_probs is None else draft_probs.gather(-1, safe_drafts[..., None])[..., 0]
    accepted = (uniforms * q_draft < p_draft) & valid  # u < p/q without dividing by a zero q
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)

    rows = torch.arange(batch, device=device)
    final_p = target_probs[rows, num_accepted]
    rejected = num_accepted < num_drafts
    if k:
        at = num_accepted.clamp(max=k - 1)
        if draft_probs is None:
            final_q = torch.zeros_like(final_p).scatter_(-1, safe_drafts[rows, at][:, None], 1.0)
        else:
            final_q = draft_probs[rows, at]
        residual = (final_p - final_q).clamp_min_(0.0)
        # p == q leaves no residual mass (then a rejection had probability 0): fall back to p
        usable = rejected & (residual.sum(dim=-1) > 0)
        final_p = torch.where(usable[:, None], residual, final_p)
    drawn = (final_p / races.clamp_min_(torch.finfo(races.dtype).tiny)).argmax(dim=-1)

    columns = torch.arange(positions, device=device)[None, :]
    padded_drafts = torch.cat([safe_drafts, torch.zeros(batch, 1, dtype=torch.long, device=device)], dim=1)
    token_ids = torch.where(columns < num_accepted[:, None], padded_drafts, -1)
    token_ids[rows, num_accepted] = drawn
    return RejectionOutput(token_ids, num_accepted)


def _draws(
    batch: int,
    k: int,
    vocab: int,
    num_drafts: list[int],
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms [B, K] for the accept tests and exponentials [B, V] for the final draw."""
    uniforms = torch.rand(batch, k, device=device, generator=shared)
    races = torch.empty(batch, vocab, device=device).exponential_(generator=shared)
    for row, generator in enumerate(generators):
        if generator is None:
            continue
        own = num_drafts[row]
        uniforms[row, :own] = torch.rand(own, device=device, generator=generator)
        races[row] = torch.empty(vocab, device=device).exponential_(generator=generator)
    return uniforms, races

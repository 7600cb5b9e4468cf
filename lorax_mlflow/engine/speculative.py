"""Speculative decoding in the engine step: who speculates, with which drafter, and verifying drafts.

A decoding sequence that speculates feeds its last token plus up to K draft tokens in the step's
packed forward; the logits at those K + 1 positions are the target distributions after each
prefix, and `rejection_sample` keeps the longest prefix of drafts the target agrees with plus one
token of its own. Drafts come from Medusa heads (the request's Medusa adapter, else the engine's
``speculative_adapter``) at the hidden state of the last accepted token, or from prompt lookup when
no heads apply and ``speculative_tokens`` > 0.

Rows whose next-token distribution depends on the tokens before it in ways the drafts would change
(grammars; repetition, presence and frequency penalties) do not speculate.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from lorax_mlflow.engine.rejection_sampler import rejection_sample
from lorax_mlflow.engine.sampling_params import SamplingParams


def can_speculate(params: SamplingParams, has_grammar: bool) -> bool:
    """Whether drafts can be verified for this row: its target distribution at each draft position must
    depend only on the logits there (no grammar state, no penalties over the tokens so far)."""
    return (
        not has_grammar
        and params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
    )


@dataclass
class VerifiedRow:
    """What one speculating row emits this step."""

    token_ids: list[int]
    logprobs: list[float]
    """Raw-logit logprob of each emitted token."""
    top: list[list[tuple[int, float]]] | None
    num_drafts: int
    num_accepted: int


@dataclass
class SpeculationCounters:
    """Draft tokens proposed and accepted, per adapter id ("" = base-model requests)."""

    proposed: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)

    def add(self, adapter_id: str, proposed: int, accepted: int) -> None:
        self.proposed[adapter_id] = self.proposed.get(adapter_id, 0) + proposed
        self.accepted[adapter_id] = self.accepted.get(adapter_id, 0) + accepted


def verify(
    sampler,
    logits: torch.Tensor,
    rows: Seq,
    drafts: Seq[Seq[int]],
) -> list[VerifiedRow]:
    """Verify each row's drafts against its logits.

    logits [sum(len(drafts[i]) + 1), V]: row i's K_i + 1 positions, packed in row order. `rows` are the
    sampler rows (sequences); each must satisfy `can_speculate`.
    """
    counts = [len(d) + 1 for d in drafts]
    flat_rows = [row for row, count in zip(rows, counts) for _ in range(count)]
    probs = sampler.probabilities(logits, flat_rows)  # [sum, V]
    batch, k_max, vocab = len(rows), max(counts) - 1, probs.shape[-1]
    device = probs.device
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0).tolist()
    positions = torch.arange(k_max + 1)[None, :]
    last = torch.tensor(counts)[:, None] - 1
    index = torch.tensor(starts)[:, None] + torch.minimum(positions, last)  # padding repeats the row's last
    target = probs[index.to(device)]  # [B, K + 1, V]
    draft_ids = torch.zeros(batch, k_max, dtype=torch.long)
    for i, chain in enumerate(drafts):
        draft_ids[i, : len(chain)] = torch.tensor(chain, dtype=torch.long)
    out = rejection_sample(
        target,
        draft_ids.to(device),
        torch.tensor([len(d) for d in drafts], device=device),
        [row.generator for row in rows],
        sampler.shared_generator,
    )
    emitted = out.token_ids.tolist()
    accepted = out.num_accepted.tolist()

    log_probs = torch.log_softmax(logits[:, :vocab].float(), dim=-1)
    flat_positions = [starts[i] + j for i in range(batch) for j in range(accepted[i] + 1)]
    flat_tokens = [emitted[i][j] for i in range(batch) for j in range(accepted[i] + 1)]
    chosen = log_probs[torch.tensor(flat_positions, device=device), torch.tensor(flat_tokens, device=device)].tolist()
    top_k = max((row.params.logprobs or 0 for row in rows), default=0)
    top_values = top_ids = None
    if top_k:
        top_values, top_ids = log_probs[torch.tensor(flat_positions, device=device)].topk(top_k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()

    results, cursor = [], 0
    for i, row in enumerate(rows):
        n = accepted[i] + 1
        k = row.params.logprobs or 0
        top = None
        if k and top_ids is not None:
            top = [list(zip(top_ids[cursor + j][:k], top_values[cursor + j][:k])) for j in range(n)]
        results.append(VerifiedRow(emitted[i][:n], chosen[cursor : cursor + n], top, len(drafts[i]), accepted[i]))
        cursor += n
    return results

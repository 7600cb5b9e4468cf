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

from lorax_mlflow.lora.weights import MedusaHeads
from lorax_mlflow.engine.medusa_drafter import draft_medusa
from lorax_mlflow.engine.prompt_lookup import propose_prompt_lookup
from lorax_mlflow.engine.rejection_sampler import rejection_sample
from lorax_mlflow.engine.sampling_params import SamplingParams


def can_speculate(params: SamplingParams, has_grammar: bool) -> bool:
    """Whether drafts can be verified for this row: its target distribution at each draft position must
    depend only on the logits there (no grammar state, no penalties over the tokens so far).

    Seeded sampling never speculates: verification draws its randomness differently from plain
    sampling, and whether a step speculates depends on the other requests (the batch-size rule), so
    a seed would no longer give the same tokens alone and in a batch."""
    seeded_sampling = params.seed is not None and params.temperature > 0
    return (
        not has_grammar
        and not seeded_sampling
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


class Speculator:
    """Decides each decoding sequence's drafts for the next step and verifies the drafts fed in this one.

    Called by the engine on its loop thread: :meth:`verify` on the rows that fed drafts, then
    :meth:`propose` for every sequence that sampled, with the hidden states of the step when
    :meth:`needs_hidden` said so.
    """

    def __init__(
        self,
        speculative_tokens: int,
        max_batch_size: int,
        medusa_of_slot: Seq[MedusaHeads | None],
        default_heads: MedusaHeads | None,
        lm_head: torch.Tensor,
        max_model_len: int,
    ) -> None:
        self.speculative_tokens = speculative_tokens
        self.max_batch_size = max_batch_size
        self.medusa_of_slot = medusa_of_slot
        """The device slots' Medusa heads, by slot (the list the slots update in place)."""
        self.default_heads = default_heads
        self.lm_head = lm_head
        self.max_model_len = max_model_len
        self.counters = SpeculationCounters()

    @property
    def enabled(self) -> bool:
        return self.speculative_tokens > 0 or self.default_heads is not None or any(self.medusa_of_slot)

    def heads_for(self, seq) -> MedusaHeads | None:
        own = self.medusa_of_slot[seq.lora_slot] if seq.lora_slot >= 0 else None
        return own if own is not None else self.default_heads

    def needs_hidden(self, seqs: Seq) -> bool:
        return any(self.heads_for(seq) is not None for seq in seqs)

    def verify(self, sampler, rows: Seq, logits: Seq[torch.Tensor]) -> list[VerifiedRow]:
        """Verify the drafts the `rows` fed (their `draft_token_ids`), given each row's [1 + K, V] logits."""
        return verify(sampler, torch.cat(list(logits)), rows, [row.draft_token_ids for row in rows])

    def propose(self, seqs: Seq, hidden: dict[int, torch.Tensor], accepted: dict[int, int], num_decoding: int) -> None:
        """Set each sequence's drafts for the next step (none when the batch is past the size limit).

        `hidden`: seq_id -> hidden states at the kept positions of this step; `accepted`: seq_id ->
        drafts accepted this step (its hidden state at that index is the last accepted token's).
        """
        off = num_decoding > self.max_batch_size
        medusa_rows, medusa_heads, medusa_counts, states = [], [], [], []
        for seq in seqs:
            seq.draft_token_ids = []
            if off or seq.is_finished:
                continue
            count = self._budget(seq)
            heads = self.heads_for(seq)
            if count <= 0:
                continue
            if heads is None:
                seq.draft_token_ids = propose_prompt_lookup(seq.token_ids, count)
            elif seq.seq_id in hidden:
                medusa_rows.append(seq)
                medusa_heads.append(heads)
                medusa_counts.append(min(count, heads.num_heads))
                states.append(hidden[seq.seq_id][accepted.get(seq.seq_id, -1)])
        if medusa_rows:
            drafts = draft_medusa(torch.stack(states), medusa_heads, medusa_counts, self.lm_head)
            for seq, chain in zip(medusa_rows, drafts):
                seq.draft_token_ids = chain

    def _budget(self, seq) -> int:
        """Drafts worth proposing: within max_tokens and the context window (the bonus token counts too)."""
        if not can_speculate(seq.params, seq.grammar is not None):
            return 0
        heads = self.heads_for(seq)
        wanted = self.speculative_tokens if heads is None else (self.speculative_tokens or heads.num_heads)
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        return min(wanted, room)

"""Batched next-token sampling with per-row parameters (OpenAI / vLLM semantics).

Processing order for each row: logit_bias, ignore_eos (eos ids masked), repetition penalty over
prompt + generated tokens, presence / frequency penalties over generated tokens, grammar bitmask,
then temperature (0 = greedy argmax of the processed logits), top_k, top_p, min_p, typical_p, and
the random draw. Reported logprobs always come from the raw model logits.

Random draws use the exponential race (token = argmax(p / q), q ~ Exp(1) per candidate), which
samples exactly from p. When every sampled row has a top_k, only the k_max best tokens of the batch
are candidates (found with `topk`, no full sort); otherwise the whole sorted vocabulary is. A seeded
row draws its q only from its own generator, and how many it draws depends only on its own
parameters (top_k values when it has a top_k, one per vocabulary token otherwise), so it gets the
same tokens whatever else shares the batch; unseeded rows share one draw from the sampler's
generator. A seeded row's generator must live on the sampler's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lorax_mlflow.engine import logits_processors as lp
from lorax_mlflow.engine.sampling_params import SamplingParams


class GrammarLike(Protocol):
    """A structured-output matcher that can write its allowed next tokens into a bitmask row."""

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None: ...


class SamplerRow(Protocol):
    """What the sampler reads from one sequence (the engine's Sequence satisfies it)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    grammar: GrammarLike | None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor
    """int64 [B]: the chosen tokens."""
    logprobs: torch.Tensor
    """float32 [B]: log_softmax of the raw logits at the chosen token."""
    top_ids: torch.Tensor | None
    """int64 [B, k] with k = the largest `params.logprobs` of the batch; None when that is 0 or unset."""
    top_logprobs: torch.Tensor | None
    """float32 [B, k]: raw log_softmax of `top_ids`, sorted descending per row."""


@dataclass
class _Candidates:
    """Each row's best tokens, in decreasing order of processed logit (before truncation)."""

    logits: torch.Tensor
    """float32 [B, C]: temperature-scaled logits, -inf where a truncation filter dropped the token."""
    ids: torch.Tensor
    """int64 [B, C]: the token id of each candidate."""


def _own_top_k(params: SamplingParams, vocab: int) -> int:
    """The row's top_k, or `vocab` when it has none."""
    return params.top_k if 0 < params.top_k < vocab else vocab


def _all_masked(processed: torch.Tensor) -> torch.Tensor:
    """bool [B]: rows whose every processed logit is -inf; they take the argmax of their raw logits."""
    return torch.isneginf(processed.amax(dim=-1))


def _raw_argmax_where_masked(tokens: torch.Tensor, raw: torch.Tensor, all_masked: torch.Tensor) -> torch.Tensor:
    """`tokens` with the raw argmax on fully masked rows. Such rows are rare, so the host checks for
    one before paying for an argmax pass over every row."""
    if bool(all_masked.any()):
        return torch.where(all_masked, raw.argmax(dim=-1), tokens)
    return tokens


def _needs_processing(params: SamplingParams, has_grammar: bool) -> bool:
    """Whether a row needs more than the argmax of its raw logits."""
    return (
        not params.greedy
        or has_grammar
        or params.ignore_eos
        or bool(params.logit_bias)
        or params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


class Sampler:
    def __init__(
        self,
        vocab_size: int,
        eos_token_ids: set[int],
        device: torch.device | str = "cpu",
        seed: int | None = None,
    ) -> None:
        """`seed` fixes the draws of unseeded rows (tests); None seeds from system entropy."""
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._eos_ids = sorted(t for t in eos_token_ids if 0 <= t < vocab_size)
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    @property
    def shared_generator(self) -> torch.Generator:
        """The generator unseeded rows draw from (speculative verification draws from it too)."""
        return self._generator

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> SamplerOutput:
        raw = self._raw(logits, rows)
        if not any(_needs_processing(row.params, row.grammar is not None) for row in rows):
            token_ids = raw.argmax(dim=-1)
        else:
            token_ids = self._sample(raw, rows)
        return self._with_logprobs(raw, token_ids, rows)

    def probabilities(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """float32 [B, vocab_size]: the probability with which each token would be drawn.

        Greedy rows (and rows whose every logit got masked) are one-hot at the token they take.
        """
        raw = self._raw(logits, rows)
        processed = self._processed_logits(raw, rows)
        all_masked = _all_masked(processed)
        argmax = _raw_argmax_where_masked(processed.argmax(dim=-1), raw, all_masked)
        one_hot = torch.zeros_like(raw).scatter_(-1, argmax[:, None], 1.0)
        if all(row.params.greedy for row in rows):
            return one_hot
        candidates = self._candidates(processed, rows)
        probs = torch.zeros_like(raw).scatter_(-1, candidates.ids, torch.softmax(candidates.logits, dim=-1))
        return torch.where((self._greedy_mask(rows, raw.device) | all_masked)[:, None], one_hot, probs)

    def _raw(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} sampler rows")
        return logits[:, : self.vocab_size].float()

    def _sample(self, raw: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """int64 [B]: greedy rows take the argmax of their processed logits, the others a draw."""
        processed = self._processed_logits(raw, rows)
        all_masked = _all_masked(processed)
        greedy = [row.params.greedy for row in rows]
        if all(greedy):
            tokens = processed.argmax(dim=-1)
        else:
            tokens = self._draw(self._candidates(processed, rows), rows)
            if any(greedy):
                tokens = torch.where(self._greedy_mask(rows, raw.device), processed.argmax(dim=-1), tokens)
        return _raw_argmax_where_masked(tokens, raw, all_masked)

    @staticmethod
    def _greedy_mask(rows: Sequence[SamplerRow], device: torch.device) -> torch.Tensor:
        return torch.tensor([row.params.greedy for row in rows], device=device)

    def _processed_logits(self, raw: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """The raw logits after bias, eos masking, penalties and grammar; still unscaled."""
        logits = raw.clone()
        device = logits.device
        self._add_logit_bias_(logits, rows)
        ignore_eos_rows = [i for i, row in enumerate(rows) if row.params.ignore_eos]
        if ignore_eos_rows and self._eos_ids:
            row_index = torch.tensor(ignore_eos_rows, device=device)[:, None]
            logits[row_index, torch.tensor(self._eos_ids, device=device)[None, :]] = lp.NEG_INF
        self._apply_penalties_(logits, rows)
        grammar_rows = [i for i, row in enumerate(rows) if row.grammar is not None]
        if grammar_rows:
            self._apply_grammar_(logits, rows, grammar_rows)
        return logits

    @staticmethod
    def _add_logit_bias_(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> None:
        entries = [(i, tok, bias) for i, row in enumerate(rows) for tok, bias in row.params.logit_bias.items()]
        entries = [e for e in entries if 0 <= e[1] < logits.shape[-1]]
        if not entries:
            return
        row_index, token_index, bias = zip(*entries)
        device = logits.device
        logits.index_put_(
            (torch.tensor(row_index, device=device), torch.tensor(token_index, device=device)),
            torch.tensor(bias, dtype=logits.dtype, device=device),
            accumulate=True,
        )

    def _apply_penalties_(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> None:
        """Repetition, then frequency / presence penalties, at each row's seen tokens only.

        One pass over every penalised row's prompt and output serves both rules: a row without a
        repetition penalty gets factor 1 and one without output penalties subtracts 0, both exact.
        """
        params = [row.params for row in rows]
        penalised = [
            p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params
        ]
        if not any(penalised):
            return
        device = logits.device
        rows_seen, tokens_seen, output_counts = lp.seen_tokens(
            [row.prompt_token_ids if wanted else [] for row, wanted in zip(rows, penalised)],
            [row.output_token_ids if wanted else [] for row, wanted in zip(rows, penalised)],
            self.vocab_size,
            device,
        )
        repetition, frequency, presence = torch.tensor(
            [
                [p.repetition_penalty for p in params],
                [p.frequency_penalty for p in params],
                [p.presence_penalty for p in params],
            ],
            dtype=logits.dtype,
        ).to(device)
        if any(p.repetition_penalty != 1.0 for p in params):
            lp.apply_repetition_penalty_(logits, rows_seen, tokens_seen, repetition)
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            lp.apply_frequency_presence_penalties_(logits, rows_seen, tokens_seen, output_counts, frequency, presence)

    def _apply_grammar_(self, logits: torch.Tensor, rows: Sequence[SamplerRow], grammar_rows: list[int]) -> None:
        from lorax_mlflow.structured import allocate_token_bitmask, apply_token_bitmask_

        bitmask = allocate_token_bitmask(len(rows), self.vocab_size)
        for i in grammar_rows:
            rows[i].grammar.fill_bitmask(bitmask, i)
        apply_token_bitmask_(logits, bitmask, grammar_rows)

    def _candidates(self, processed: torch.Tensor, rows: Sequence[SamplerRow]) -> _Candidates:
        """The sampled rows' candidates, temperature-scaled and truncated by top-k / top-p / min-p / typical-p.

        When every sampled row has a top_k, the largest of them is the width: `topk` then finds
        every token any filter could keep, and the filters, softmax and draw run on [B, k_max]
        instead of the sorted vocabulary (the tokens left out have probability zero either way).
        Otherwise the whole vocabulary is sorted. Greedy rows ride along; their candidates are
        never used.
        """
        params = [row.params for row in rows]
        vocab = processed.shape[-1]
        top_k = [_own_top_k(p, vocab) for p in params]
        width = max(k for k, p in zip(top_k, params) if not p.greedy)
        if width < vocab:
            values, ids = torch.topk(processed, width, dim=-1)
        else:
            values, ids = torch.sort(processed, dim=-1, descending=True)
        temperature, top_p, min_p, typical_p = torch.tensor(
            [
                [p.temperature if not p.greedy else 1.0 for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.typical_p for p in params],
            ],
            dtype=processed.dtype,
        ).to(processed.device)
        candidates = _Candidates(values / temperature[:, None], ids)
        use_top_k = any(k < width for k, p in zip(top_k, params) if not p.greedy)
        lp.truncate_sorted_(
            candidates.logits,
            top_k=torch.tensor(top_k).to(processed.device) if use_top_k else None,
            top_p=top_p if any(p.top_p < 1.0 for p in params) else None,
            min_p=min_p if any(p.min_p > 0.0 for p in params) else None,
            typical_p=typical_p if any(p.typical_p < 1.0 for p in params) else None,
        )
        return candidates

    def _draw(self, candidates: _Candidates, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """int64 [B]: one exponential-race draw per sampled row among its candidates.

        Unseeded rows share one draw from the sampler's generator. A seeded row draws from its own
        generator exactly as many values as its own parameters say, so its tokens do not depend on
        what shares the batch: with a top_k it draws k values and hands them to its k best tokens
        in increasing token-id order (so the sort order among equal logits does not matter);
        without one it draws one value per vocabulary token, by token id. (The one thing the batch
        can still change: which of several exactly equal logits straddling a row's k-th place makes
        its top-k, as `topk` and `sort` may break that tie differently.)
        """
        probs = torch.softmax(candidates.logits, dim=-1)
        race = torch.ones_like(probs)
        unseeded = [i for i, row in enumerate(rows) if row.generator is None and not row.params.greedy]
        if unseeded:
            shared = probs.new_empty(len(unseeded), probs.shape[-1]).exponential_(generator=self._generator)
            race.index_copy_(0, torch.tensor(unseeded, device=probs.device), shared)
        vocab = self.vocab_size
        for i, row in enumerate(rows):
            if row.generator is None or row.params.greedy:
                continue
            k = _own_top_k(row.params, vocab)
            draws = probs.new_empty(k).exponential_(generator=row.generator)
            if k < vocab:
                race[i, torch.argsort(candidates.ids[i, :k])] = draws
            else:
                race[i] = draws[candidates.ids[i]]
        # a zero draw would turn a zero-probability token into 0/0; exponential_ may return 0
        choice = (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(dim=-1)
        return candidates.ids.gather(-1, choice[:, None])[:, 0]

    @staticmethod
    def _with_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplerRow]) -> SamplerOutput:
        # the fused log_softmax kernel beats logsumexp (amax, sub, exp, sum as separate passes)
        log_probs = torch.log_softmax(raw, dim=-1)
        chosen = log_probs.gather(-1, token_ids[:, None])[:, 0]
        top_k = max((row.params.logprobs for row in rows if row.params.logprobs is not None), default=0)
        if top_k:
            top_logprobs, top_ids = log_probs.topk(top_k, dim=-1)
            return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)
        return SamplerOutput(token_ids, chosen, None, None)

"""Batched next-token sampling with per-row parameters (OpenAI / vLLM semantics).

Processing order for each row: logit_bias, ignore_eos (eos ids masked), repetition penalty over
prompt + generated tokens, presence / frequency penalties over generated tokens, grammar bitmask,
then temperature (0 = greedy argmax of the processed logits), top_k, top_p, min_p, typical_p, and
the random draw. Reported logprobs always come from the raw model logits.

Random draws use the exponential race (token = argmax(p / q), q ~ Exp(1) over the vocabulary),
which samples exactly from p. A seeded row draws its q only from its own generator, so it gets
the same tokens whatever else shares the batch; unseeded rows share one draw from the sampler's
generator.
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

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> SamplerOutput:
        raw = self._raw(logits, rows)
        if not any(_needs_processing(row.params, row.grammar is not None) for row in rows):
            token_ids = raw.argmax(dim=-1)
        elif all(row.params.greedy for row in rows):
            token_ids = self._probabilities(raw, rows).argmax(dim=-1)
        else:
            token_ids = self._draw(self._probabilities(raw, rows), rows)
        return self._with_logprobs(raw, token_ids, rows)

    def probabilities(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """float32 [B, vocab_size]: the probability with which each token would be drawn.

        Greedy rows (and rows whose every logit got masked) are one-hot at the token they take.
        """
        return self._probabilities(self._raw(logits, rows), rows)

    def _raw(self, logits: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} sampler rows")
        return logits[:, : self.vocab_size].float()

    def _probabilities(self, raw: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        processed = self._processed_logits(raw, rows)
        all_masked = torch.isneginf(processed).all(dim=-1)
        argmax = torch.where(all_masked, raw.argmax(dim=-1), processed.argmax(dim=-1))
        one_hot = torch.zeros_like(raw).scatter_(-1, argmax[:, None], 1.0)
        greedy = torch.tensor([row.params.greedy for row in rows]).to(raw.device)
        if bool(greedy.all()):
            return one_hot
        probs = torch.softmax(self._truncated(processed, rows), dim=-1)
        return torch.where((greedy | all_masked)[:, None], one_hot, probs)

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
        params = [row.params for row in rows]
        wants_repetition = [p.repetition_penalty != 1.0 for p in params]
        wants_output_penalty = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
        if not (any(wants_repetition) or any(wants_output_penalty)):
            return
        device = logits.device
        outputs = [
            row.output_token_ids if rep or out else []
            for row, rep, out in zip(rows, wants_repetition, wants_output_penalty)
        ]
        output_counts = lp.token_count_matrix(outputs, self.vocab_size, device)
        if any(wants_repetition):
            prompts = [row.prompt_token_ids if rep else [] for row, rep in zip(rows, wants_repetition)]
            seen = (lp.token_count_matrix(prompts, self.vocab_size, device) > 0) | (output_counts > 0)
            penalty = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype).to(device)
            lp.apply_repetition_penalty_(logits, seen, penalty)
        if any(wants_output_penalty):
            frequency, presence = torch.tensor(
                [[p.frequency_penalty for p in params], [p.presence_penalty for p in params]], dtype=logits.dtype
            ).to(device)
            lp.apply_frequency_presence_penalties_(logits, output_counts, frequency, presence)

    def _apply_grammar_(self, logits: torch.Tensor, rows: Sequence[SamplerRow], grammar_rows: list[int]) -> None:
        from lorax_mlflow.structured import allocate_token_bitmask, apply_token_bitmask_

        bitmask = allocate_token_bitmask(len(rows), self.vocab_size)
        for i in grammar_rows:
            rows[i].grammar.fill_bitmask(bitmask, i)
        apply_token_bitmask_(logits, bitmask, grammar_rows)

    def _truncated(self, processed: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """Temperature-scaled logits with top-k / top-p / min-p / typical-p survivors only (others -inf)."""
        params = [row.params for row in rows]
        vocab = processed.shape[-1]
        temperature, top_p, min_p, typical_p = torch.tensor(
            [
                [p.temperature if not p.greedy else 1.0 for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.typical_p for p in params],
            ],
            dtype=processed.dtype,
        ).to(processed.device)
        scaled = processed / temperature[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        use_top_k = any(k < vocab for k in top_k)
        use_top_p = any(p.top_p < 1.0 for p in params)
        use_min_p = any(p.min_p > 0.0 for p in params)
        use_typical = any(p.typical_p < 1.0 for p in params)
        if not (use_top_k or use_top_p or use_min_p or use_typical):
            return scaled
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        lp.truncate_sorted_(
            sorted_logits,
            top_k=torch.tensor(top_k).to(processed.device) if use_top_k else None,
            top_p=top_p if use_top_p else None,
            min_p=min_p if use_min_p else None,
            typical_p=typical_p if use_typical else None,
        )
        return torch.empty_like(scaled).scatter_(-1, order, sorted_logits)

    def _draw(self, probs: torch.Tensor, rows: Sequence[SamplerRow]) -> torch.Tensor:
        """One exponential-race draw per row from `probs`; seeded rows use only their own generator."""
        race = torch.empty_like(probs)
        race.exponential_(generator=self._generator)
        for i, row in enumerate(rows):
            if row.generator is not None and not row.params.greedy:
                own = torch.empty(probs.shape[-1], dtype=probs.dtype, device=row.generator.device)
                race[i] = own.exponential_(generator=row.generator).to(probs.device)
        # a zero draw would turn a zero-probability token into 0/0; exponential_ may return 0
        return (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(dim=-1)

    @staticmethod
    def _with_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplerRow]) -> SamplerOutput:
        requested = [row.params.logprobs for row in rows if row.params.logprobs is not None]
        top_k = max(requested, default=0)
        if top_k:
            log_probs = torch.log_softmax(raw, dim=-1)
            chosen = log_probs.gather(-1, token_ids[:, None])[:, 0]
            top_logprobs, top_ids = log_probs.topk(top_k, dim=-1)
            return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)
        chosen = raw.gather(-1, token_ids[:, None])[:, 0] - torch.logsumexp(raw, dim=-1)
        return SamplerOutput(token_ids, chosen, None, None)

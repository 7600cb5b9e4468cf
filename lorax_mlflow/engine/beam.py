"""Beam search in the engine: one request's live beams, its finished hypotheses, and each step's selection.

A beam request (``use_beam_search``, width ``best_of``) runs as a group of sequences. The prompt
is prefilled once, by one sequence; each step the group's live beams feed their last token
together, and :meth:`BeamSearch.select` picks the next live beams from the log-softmax of their
logits. The scheduler then forks them (:meth:`Scheduler.advance_beams`): a beam continued by
several candidates shares its KV blocks with the copies (copy-on-write on their next append), a
beam continued by none frees its blocks. Preempting any beam restarts the whole search from the
prompt (:meth:`BeamSearch.restart`): the search is deterministic, so only work is lost.

Semantics are those of transformers' ``generate(num_beams=W, do_sample=False, length_penalty,
early_stopping, num_return_sequences=n)`` (``GenerationMixin._beam_search``, transformers 5):

- candidates: each live beam's cumulative log-probability (float32) plus the log_softmax of its
  raw next-token logits; the best ``max(2, 1 + number of stop tokens) * W`` over all beams are
  taken in order (so W non-stop candidates always remain). Stop tokens are the EOS ids (unless
  ``ignore_eos``, which also removes EOS from the candidates) and ``stop_token_ids``;
- a candidate ending with a stop token finishes a hypothesis only when it is among the W best
  candidates; its score is ``cumulative_logprob / generated_length ** length_penalty``, the stop
  token counted. The W best hypotheses are kept;
- the W best non-stop candidates are the next live beams;
- at ``max_tokens`` the W best candidates all become hypotheses and the search ends;
- before that, once W hypotheses are finished: ``early_stopping=True`` ends the search;
  ``False`` ends it when the best live beam, scored at its current length, is no better than the
  worst hypothesis; ``"never"`` does the same but, for a positive length_penalty, scores the best
  live beam as if it reached ``max_tokens`` (HF's heuristics; HF notes that ``"never"`` with
  ``length_penalty=0`` is the canonical beam search);
- the n best hypotheses are returned, best first, with their summed token log-probabilities.

Width 1 is a beam search too (a stop token can be passed over for a longer beam that scores
better), where HF's ``num_beams=1`` switches to greedy decoding.

Temperature, top-k/p, min-p, penalties, logit_bias and seeds do not apply (HF beam search without
sampling and without logits processors); stop strings and structured output are rejected at
validation. ``logprobs`` reports each token's log-probability and its beam's top alternatives at
that step (EOS left out under ``ignore_eos``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.engine.sequence import Sequence, SequenceStatus

TopLogprobs = list[tuple[int, float]]
"""One position's best alternatives: (token id, logprob), most likely first (as on the wire)."""


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens (the stop token included when one ended it)."""

    token_ids: list[int]
    logprobs: list[float]
    """Each token's log-probability under the raw model distribution."""
    top: list[TopLogprobs] | None
    """Per token, its beam's best alternatives at that step, when the request asked for logprobs > 0."""
    score: float
    """cumulative_logprob / len(token_ids) ** length_penalty."""
    finish_reason: str


@dataclass
class Continuation:
    """A next live beam: live beam `parent` extended by `token`."""

    parent: int
    token: int
    logprob: float
    cumulative_logprob: float
    top: TopLogprobs | None = None


@dataclass(eq=False)
class BeamSearch:
    """One beam request's search state. ``live`` is also the request's ``sequences`` (mutated in place)."""

    head: Sequence
    width: int
    stop_token_ids: frozenset[int]
    masked_token_ids: tuple[int, ...]
    """Tokens that are never candidates (EOS under ignore_eos)."""
    max_tokens: int
    """Generated tokens at most: max_tokens, within the context window."""
    live: list[Sequence] = field(default_factory=list)
    live_logprobs: list[list[float]] = field(default_factory=list)
    """Per live beam, its tokens' log-probabilities."""
    live_top: list[list[TopLogprobs]] = field(default_factory=list)
    """Per live beam, its tokens' top alternatives (empty lists unless the request asked for logprobs > 0)."""
    hypotheses: list[Hypothesis] = field(default_factory=list)
    """The best finished beams, best first, at most `width`."""
    done: bool = False

    def __post_init__(self) -> None:
        self.head.beam = self
        self.live.append(self.head)
        self.live_logprobs.append([])
        self.live_top.append([])

    @classmethod
    def of(cls, head: Sequence, eos_token_ids: set[int], max_model_len: int) -> BeamSearch:
        params = head.params
        eos = frozenset(eos_token_ids)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos)
        masked = tuple(sorted(eos - stops)) if params.ignore_eos else ()
        return cls(head, params.num_sequences, stops, masked,
                   min(params.max_tokens, max_model_len - head.num_prompt_tokens))

    @property
    def params(self) -> SamplingParams:
        return self.head.params

    @property
    def num_candidates(self) -> int:
        """Candidates considered per step: enough for W live beams even if each beam's best are stop tokens."""
        return max(2, 1 + len(self.stop_token_ids)) * self.width

    def select(self, logits: torch.Tensor) -> list[Continuation]:
        """One step: `logits` [len(live), V] are the live beams' next-token logits, in ``live`` order.

        Records finished hypotheses and returns the next live beams, best first; returns [] and sets
        ``done`` when the search ends.
        """
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if self.masked_token_ids:
            logprobs[:, list(self.masked_token_ids)] = float("-inf")
        cumulative = torch.tensor([seq.cumulative_logprob for seq in self.live], dtype=torch.float32,
                                  device=logprobs.device)
        scores = (logprobs + cumulative[:, None]).flatten()
        top_scores, top_index = scores.topk(min(self.num_candidates, scores.numel()))
        vocab = logprobs.shape[-1]
        length = self.live[0].num_output_tokens + 1
        last = length >= self.max_tokens
        normalised = (top_scores / (length ** self.params.length_penalty)).tolist()
        cumulatives = top_scores.tolist()
        parents = (top_index // vocab).tolist()
        tokens = (top_index % vocab).tolist()
        token_logprobs = logprobs.flatten()[top_index].tolist()
        tops = self._top_alternatives(logprobs)
        finished: list[Hypothesis] = []
        children: list[Continuation] = []
        for rank, (parent, token) in enumerate(zip(parents, tokens)):
            stops = token in self.stop_token_ids
            if stops or last:
                if rank < self.width:
                    finished.append(Hypothesis(
                        self.live[parent].output_token_ids + [token],
                        self.live_logprobs[parent] + [token_logprobs[rank]],
                        None if tops is None else self.live_top[parent] + [tops[parent]],
                        normalised[rank],
                        "stop" if stops else "length",
                    ))
            elif len(children) < self.width:
                children.append(Continuation(parent, token, token_logprobs[rank], cumulatives[rank],
                                             None if tops is None else tops[parent]))
        self.hypotheses = sorted(self.hypotheses + finished, key=lambda h: -h.score)[: self.width]
        self.done = last or not children or self._cannot_improve(children[0], length)
        return [] if self.done else children

    def _top_alternatives(self, logprobs: torch.Tensor) -> list[TopLogprobs] | None:
        """Each live beam's best next tokens, when the request asked for them."""
        k = self.params.logprobs or 0
        if not k:
            return None
        values, ids = logprobs.topk(k, dim=-1)
        return [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]

    def _cannot_improve(self, best: Continuation, length: int) -> bool:
        """HF's stopping rule once `width` hypotheses are finished (see the module docstring)."""
        if len(self.hypotheses) < self.width:
            return False
        early_stopping = self.params.early_stopping
        if early_stopping is True:
            return True
        penalty = self.params.length_penalty
        if early_stopping == "never" and penalty > 0:
            length = self.max_tokens
        bound = torch.tensor([best.cumulative_logprob], dtype=torch.float32) / (length ** penalty)
        return bound.item() <= self.hypotheses[-1].score

    def advance(self, beams: list[Sequence], chosen: list[Continuation]) -> None:
        """Make `beams` (the scheduler's forks, one per continuation) the live beams and append their tokens.

        Each of `beams` holds its parent's tokens; the parents' logprob lists are read before any changes.
        """
        logprobs = [self.live_logprobs[c.parent] + [c.logprob] for c in chosen]
        top = [self.live_top[c.parent] + ([c.top] if c.top is not None else []) for c in chosen]
        for seq, continuation in zip(beams, chosen):
            seq.token_ids.append(continuation.token)
            seq.cumulative_logprob = continuation.cumulative_logprob
        self.live[:] = beams
        self.live_logprobs[:] = logprobs
        self.live_top[:] = top

    def copy_of(self, parent: Sequence) -> Sequence:
        """A new running beam with `parent`'s tokens and progress (its blocks are forked by the scheduler)."""
        return self._beam_from(parent, list(parent.token_ids), status=SequenceStatus.RUNNING,
                               num_cached_tokens=parent.num_cached_tokens,
                               cumulative_logprob=parent.cumulative_logprob)

    def restart(self) -> Sequence:
        """Start over from the prompt (after a preemption): a new head is the only live beam."""
        head = self.head
        self.head = self._beam_from(head, head.prompt_token_ids)
        self.live[:] = [self.head]
        self.live_logprobs[:] = [[]]
        self.live_top[:] = [[]]
        self.hypotheses = []
        return self.head

    def _beam_from(self, parent: Sequence, token_ids: list[int], **progress) -> Sequence:
        """A sequence of this search with `parent`'s request, prompt and adapter, and `token_ids`."""
        return Sequence(request_id=parent.request_id, token_ids=token_ids, num_prompt_tokens=parent.num_prompt_tokens,
                        params=parent.params, adapter_key=parent.adapter_key,
                        num_cached_prompt_tokens=parent.num_cached_prompt_tokens, beam=self, **progress)

    def best(self) -> list[Hypothesis]:
        """The n best hypotheses, best first."""
        return self.hypotheses[: self.params.n]

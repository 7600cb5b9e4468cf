"""Beam search (`use_beam_search`, `best_of` = beam width, `length_penalty`, `early_stopping`).

Semantics are those of Hugging Face `generate(num_beams=k, do_sample=False, length_penalty,
early_stopping, num_return_sequences=n)`:

- every step, each live beam's next-token log-probabilities (log_softmax of the raw logits) are
  added to its cumulative log-probability; of all beams' candidates, the 2k best are considered in
  order: a candidate that ends with EOS (or a stop token id) and is among the k best becomes a
  finished hypothesis, the k best others become the next live beams;
- a hypothesis scores `cumulative_logprob / generated_length ** length_penalty` (its EOS counted);
- `early_stopping=True` stops once k hypotheses are finished; `False` once k are finished and no
  live beam can still beat the worst of them at its current length; `"never"` also assumes, for a
  positive length_penalty, that a live beam could grow to max_tokens;
- at max_tokens the live beams join the hypotheses; the n best are returned, best first.

Temperature, top-k/top-p and penalties do not apply (as in HF beam search without sampling).

It runs above the engine: each step submits one single-token request per live beam and reads the
2k best alternatives from that token's logprobs. The engine batches a step's beams together; the
beams' common prompt is prefilled again for each of them until the prefix cache shares it.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lorax_mlflow.errors import InvalidRequestError

MAX_BEAM_WIDTH = 10
"""2k alternatives per beam are read from the engine's top logprobs, which stop at 20."""


@dataclass(frozen=True)
class BeamSearchParams:
    width: int
    max_tokens: int
    n: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def validate(self) -> None:
        if not 1 <= self.width <= MAX_BEAM_WIDTH:
            raise InvalidRequestError(f"best_of (the beam width) must be in [1, {MAX_BEAM_WIDTH}] with use_beam_search",
                                      param="best_of")
        if not 1 <= self.n <= self.width:
            raise InvalidRequestError("n must be in [1, best_of] with use_beam_search", param="n")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidRequestError('early_stopping must be true, false or "never"', param="early_stopping")


@dataclass
class Beam:
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finished: bool = False
    """Ended with a stop token (else it ran to max_tokens)."""

    def score(self, length_penalty: float) -> float:
        return self.cumulative_logprob / (max(len(self.token_ids), 1) ** length_penalty)


Alternatives = Callable[[Sequence[list[int]]], list[list[tuple[int, float]]]]
"""For each given continuation (generated tokens so far), the best next tokens and their log-probs,
best first, at least 2k of them."""


class _Hypotheses:
    """The k best finished beams by score."""

    def __init__(self, width: int, length_penalty: float) -> None:
        self.width = width
        self.length_penalty = length_penalty
        self._heap: list[tuple[float, int, Beam]] = []
        self._count = 0

    def add(self, beam: Beam) -> None:
        self._count += 1
        item = (beam.score(self.length_penalty), self._count, beam)
        if len(self._heap) < self.width:
            heapq.heappush(self._heap, item)
        elif item[0] > self._heap[0][0]:
            heapq.heapreplace(self._heap, item)

    @property
    def full(self) -> bool:
        return len(self._heap) >= self.width

    @property
    def worst_score(self) -> float:
        return self._heap[0][0]

    def best(self, n: int) -> list[Beam]:
        return [beam for _, _, beam in sorted(self._heap, key=lambda item: (-item[0], item[1]))[:n]]


def _done(hypotheses: _Hypotheses, live: list[Beam], params: BeamSearchParams) -> bool:
    if not hypotheses.full:
        return False
    if params.early_stopping is True:
        return True
    best_live = max(beam.cumulative_logprob for beam in live)
    length = len(live[0].token_ids)
    if params.early_stopping == "never" and params.length_penalty > 0:
        length = params.max_tokens
    return best_live / (max(length, 1) ** params.length_penalty) <= hypotheses.worst_score


def beam_search(alternatives: Alternatives, params: BeamSearchParams, stop_token_ids: set[int]) -> list[Beam]:
    """The n best beams, best first (see the module docstring)."""
    k = params.width
    live = [Beam()]
    hypotheses = _Hypotheses(k, params.length_penalty)
    for _ in range(params.max_tokens):
        candidates = []
        for beam, options in zip(live, alternatives([beam.token_ids for beam in live])):
            candidates += [(beam.cumulative_logprob + logprob, token, beam) for token, logprob in options[: 2 * k]]
        candidates.sort(key=lambda c: -c[0])
        next_live: list[Beam] = []
        for rank, (score, token, beam) in enumerate(candidates[: 2 * k]):
            extended = Beam(beam.token_ids + [token], score)
            if token in stop_token_ids:
                if rank < k:
                    extended.finished = True
                    hypotheses.add(extended)
                continue
            next_live.append(extended)
            if len(next_live) == k:
                break
        live = next_live
        if not live or _done(hypotheses, live, params):
            return hypotheses.best(params.n)
    for beam in live:  # max_tokens reached: the live beams compete with the finished ones
        hypotheses.add(beam)
    return hypotheses.best(params.n)

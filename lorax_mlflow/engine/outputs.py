"""What the engine hands back: per-request snapshots with cumulative text and the latest delta."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_LOGPROB = -9999.0
"""What a logprob of -inf (or NaN) is reported as: JSON has no infinities (vLLM's convention)."""


def json_safe_logprob(value: float) -> float:
    """`value` when finite, else MIN_LOGPROB (log-probabilities are never above 0)."""
    return value if math.isfinite(value) else MIN_LOGPROB


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    """Top alternatives (token id, logprob), most likely first."""

    def __post_init__(self) -> None:
        # Non-finite values (a masked token, an overflowing fp16 model) must never reach JSON.
        self.logprob = json_safe_logprob(self.logprob)
        self.top = [(token_id, json_safe_logprob(logprob)) for token_id, logprob in self.top]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_draft_tokens: int = 0
    """Speculative draft tokens verified for this sequence so far, and how many were accepted."""
    num_accepted_draft_tokens: int = 0


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    adapter_id: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache (OpenAI's ``prompt_tokens_details.cached_tokens``)."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

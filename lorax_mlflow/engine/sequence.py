"""One generated sequence: its tokens, KV blocks, adapter slot and sampling state."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

import torch

from lorax_mlflow.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lorax_mlflow.engine.beam import BeamSearch

_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    """A prompt plus what has been generated for it so far.

    ``num_cached_tokens`` counts tokens whose K/V are already in the paged cache; the next step
    feeds ``token_ids[num_cached_tokens:]``. Preemption (recompute) resets it to 0.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    adapter_key: str | None = None
    """Cache key of the request's adapter, None for the base model."""
    generator: torch.Generator | None = None
    grammar: Any = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    lora_slot: int = -1
    draft_token_ids: list[int] = field(default_factory=list)
    """Speculative tokens proposed for the next step to verify (Medusa heads or prompt lookup)."""
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0
    num_cached_prompt_tokens: int | None = None
    """Prompt tokens whose K/V the prefix cache supplied when this sequence was first admitted."""
    hash_identity: str | None = None
    """Prefix cache: identity of the weights computing this sequence's K/V (see block_manager)."""
    block_chain: list[bytes] = field(default_factory=list)
    """Prefix cache: hashes of the first full blocks of ``token_ids`` under ``hash_identity``."""
    num_registered_blocks: int = 0
    """Prefix cache: leading blocks of ``block_table`` already offered to the cache."""
    beam: BeamSearch | None = None
    """The beam search this sequence is a live beam of (scheduled, preempted and forked with its group)."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

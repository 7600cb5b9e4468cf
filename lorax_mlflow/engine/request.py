"""A request as the core sees it: one prompt and its `best_of` (or `n`) sequences, or a beam search's live beams."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.engine.sequence import Sequence


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence] = field(default_factory=list)
    """Its sequences; for a beam search, the search's live beams (the same list, changed by each step)."""
    first_scheduled_time: float | None = None
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]] | None] | None = None
    """Grows chunk by chunk for requests that asked for them; sent to the client once complete."""
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)

    def index_of(self, seq: Sequence) -> int:
        """The sequence's position in the request (how the client tells its sequences apart)."""
        for index, candidate in enumerate(self.sequences):
            if candidate is seq:
                return index
        raise ValueError(f"sequence {seq.seq_id} is not part of request {self.request_id}")

"""A submitted request: one prompt, `best_of` (or `n`) sequences, and what has been emitted so far."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lorax_mlflow.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.engine.sequence import Sequence
from lorax_mlflow.engine.stream import RequestStream


@dataclass
class SequenceOutputState:
    """Per-sequence output bookkeeping: the detokenizer and what has not been emitted yet."""

    detokenizer: Any
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_text: str = ""
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    adapter_key: str | None = None
    """Cache key of the adapter, None for the base model."""
    adapter_id: str | None = None
    """The id the caller used (reported back in outputs and metrics)."""
    sequences: list[Sequence] = field(default_factory=list)
    states: dict[int, SequenceOutputState] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)

    @property
    def streams_deltas(self) -> bool:
        """best_of > n ranks sequences at the end, so nothing is emitted before that."""
        return self.params.num_sequences == self.params.n

    def chosen_sequences(self) -> list[Sequence]:
        if self.streams_deltas:
            return self.sequences
        ranked = sorted(self.sequences, key=lambda s: s.cumulative_logprob, reverse=True)
        return ranked[: self.params.n]

    def take_output(self) -> RequestOutput:
        """Snapshot for the caller: cumulative text plus the delta since the previous snapshot."""
        want_logprobs = self.params.logprobs is not None
        outputs = []
        for index, seq in enumerate(self.chosen_sequences()):
            state = self.states[seq.seq_id]
            text = state.detokenizer.text
            outputs.append(
                CompletionOutput(
                    index=index,
                    text=text,
                    token_ids=seq.output_token_ids,
                    finish_reason=seq.finish_reason,
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=list(state.logprobs) if want_logprobs else None,
                    delta_text=state.pending_text if self.streams_deltas else text,
                    delta_token_ids=state.pending_token_ids if self.streams_deltas else seq.output_token_ids,
                    delta_logprobs=state.pending_logprobs if self.streams_deltas else list(state.logprobs),
                )
            )
            state.pending_text, state.pending_token_ids, state.pending_logprobs = "", [], []
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            adapter_id=self.adapter_id,
            prompt_logprobs=self.prompt_logprobs,
            metrics=self.metrics,
        )

"""Client side of generation: core token batches -> per-request text, stop strings, logprobs, streams.

For every request it keeps each sequence's incremental detokenizer and what has not been emitted
yet. :meth:`OutputProcessor.process` takes one step's :class:`EngineCoreOutputs`, decodes the new
tokens, finds stop strings (and tells the core to stop those sequences), and puts one
:class:`RequestOutput` snapshot per advanced request into its :class:`RequestStream`.
Thread-safe: the receiver of core outputs and callers aborting requests may run on different threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lorax_mlflow.client.detokenizer import IncrementalDetokenizer
from lorax_mlflow.client.stream import RequestStream
from lorax_mlflow.engine.messages import EngineCoreOutputs, RequestDelta, SequenceDelta
from lorax_mlflow.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import LoraxError

AbortSequences = Callable[[str, "list[int] | None"], None]
"""Tells the core to stop a request's sequences (None: all of them)."""


@dataclass
class SequenceState:
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    pending_text: str = ""
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_draft_tokens: int = 0
    """Speculative draft tokens verified so far, and how many were accepted."""
    num_accepted_draft_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    adapter_id: str | None
    sequences: list[SequenceState]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)

    @property
    def streams_deltas(self) -> bool:
        """best_of > n ranks sequences at the end, and a beam search's beams arrive whole when it ends,
        so nothing is emitted before that."""
        return self.params.num_sequences == self.params.n and not self.params.use_beam_search

    def take_output(self) -> RequestOutput:
        """Snapshot for the caller: cumulative text plus the delta since the previous snapshot."""
        want_logprobs = self.params.logprobs is not None
        chosen = self.sequences
        if not self.streams_deltas and not self.params.use_beam_search:  # beams come best first
            chosen = sorted(self.sequences, key=lambda s: s.cumulative_logprob, reverse=True)[: self.params.n]
        outputs = []
        for index, seq in enumerate(chosen):
            text = seq.detokenizer.text
            outputs.append(CompletionOutput(
                index=index,
                text=text,
                token_ids=list(seq.token_ids),
                finish_reason=seq.finish_reason,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if want_logprobs else None,
                delta_text=seq.pending_text if self.streams_deltas else text,
                delta_token_ids=seq.pending_token_ids if self.streams_deltas else list(seq.token_ids),
                delta_logprobs=seq.pending_logprobs if self.streams_deltas else list(seq.logprobs),
                num_draft_tokens=seq.num_draft_tokens,
                num_accepted_draft_tokens=seq.num_accepted_draft_tokens,
            ))
            seq.pending_text, seq.pending_token_ids, seq.pending_logprobs = "", [], []
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            adapter_id=self.adapter_id,
            prompt_logprobs=self.prompt_logprobs,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: Iterable[int], abort_in_core: AbortSequences) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self._abort_in_core = abort_in_core
        self._requests: dict[str, RequestState] = {}
        self._lock = threading.Lock()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, stream: RequestStream,
            adapter_id: str | None) -> RequestState:
        count = params.n if params.use_beam_search else params.num_sequences  # the core sends a search's n best
        sequences = [SequenceState(IncrementalDetokenizer(self.tokenizer, params, prompt_token_ids))
                     for _ in range(count)]
        state = RequestState(request_id, list(prompt_token_ids), params, stream, adapter_id, sequences)
        with self._lock:
            self._requests[request_id] = state
        return state

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def abort(self, request_id: str) -> bool:
        """The caller left: stop it in the core, then finish it as aborted (a last snapshot goes to its
        stream). Returns whether it was still in flight."""
        with self._lock:
            state = self._requests.pop(request_id, None)
        if state is None:
            return False
        self._abort_in_core(request_id, None)
        for seq in state.sequences:
            if not seq.finished:
                seq.finish_reason = "abort"
        state.stream.put(state.take_output())
        return True

    def forget(self, request_id: str) -> None:
        """Drop a request that never reached the core."""
        with self._lock:
            self._requests.pop(request_id, None)

    def fail_all(self, error: LoraxError) -> None:
        """The core is gone: every request in flight ends with `error`."""
        with self._lock:
            states, self._requests = list(self._requests.values()), {}
        for state in states:
            state.stream.put(error)

    def process(self, outputs: EngineCoreOutputs) -> None:
        emitted: list[tuple[RequestStream, RequestOutput | LoraxError]] = []
        stops: list[tuple[str, list[int]]] = []
        with self._lock:
            for delta in outputs.requests:
                state = self._requests.get(delta.request_id)
                if state is None:
                    continue  # aborted by its caller meanwhile
                if delta.error is not None:
                    del self._requests[delta.request_id]
                    emitted.append((state.stream, delta.error.to_error()))
                    continue
                stopped = self._apply(state, delta, outputs.timestamp)
                if stopped:
                    stops.append((delta.request_id, stopped))
                if state.finished:
                    del self._requests[delta.request_id]
                    state.metrics.finished_time = time.time()
                    emitted.append((state.stream, state.take_output()))
                elif state.streams_deltas:
                    emitted.append((state.stream, state.take_output()))
        for request_id, indices in stops:
            self._abort_in_core(request_id, indices)
        for stream, item in emitted:
            stream.put(item)

    def _apply(self, state: RequestState, delta: RequestDelta, timestamp: float) -> list[int]:
        """Fold one step's delta into the request; returns the sequences a stop string just finished
        (the core still runs them until told)."""
        if delta.first_scheduled_time is not None:
            state.metrics.first_scheduled_time = delta.first_scheduled_time
        if delta.num_cached_tokens is not None:
            state.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            state.prompt_logprobs = [None if p is None else TokenLogprob(p[0], p[1], [tuple(t) for t in p[2]])
                                     for p in delta.prompt_logprobs]
        stopped = []
        for seq_delta in delta.sequences:
            if seq_delta.token_ids and state.metrics.first_token_time is None:
                state.metrics.first_token_time = timestamp
            if self._apply_sequence(state.params, state.sequences[seq_delta.index], seq_delta):
                stopped.append(seq_delta.index)
        return stopped

    def _apply_sequence(self, params: SamplingParams, seq: SequenceState, delta: SequenceDelta) -> bool:
        """True when a stop string finished the sequence before the core did."""
        if seq.finished:
            return False  # tokens the core generated before it heard of the stop string
        seq.num_draft_tokens += delta.draft_tokens
        seq.num_accepted_draft_tokens += delta.accepted_draft_tokens
        for i, token in enumerate(delta.token_ids):
            seq.token_ids.append(token)
            seq.cumulative_logprob += delta.logprobs[i]
            seq.pending_token_ids.append(token)
            if params.logprobs is not None:
                top = [tuple(t) for t in delta.top[i]] if delta.top is not None else []
                entry = TokenLogprob(token, delta.logprobs[i], top)
                seq.logprobs.append(entry)
                seq.pending_logprobs.append(entry)
            is_stop_token = (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids
            if not is_stop_token or params.include_stop_str_in_output:
                seq.pending_text += seq.detokenizer.add(token)
            if seq.detokenizer.stop_string is not None:
                seq.finish_reason = "stop"
                return delta.finish_reason is None or i < len(delta.token_ids) - 1
        if delta.finish_reason is not None:
            seq.finish_reason = delta.finish_reason
            seq.pending_text += seq.detokenizer.flush()
        return False

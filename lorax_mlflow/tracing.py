"""MLflow traces of requests: one trace per ``predict`` / ``predict_stream`` call and per HTTP generation
request of ``lorax-mlflow serve`` (chat completions, completions, /generate, /generate_stream).

Switched on like MLflow's own library integrations (``mlflow.openai.autolog()``): call
``lorax_mlflow.tracing.autolog()`` in Python, or set ``LORAX_MLFLOW_TRACING=1`` for a serving
process (``mlflow models serve``). It is opt-in because MLflow's default tracking store is a
sqlite file in the working directory: tracing by default would create and write that file from
every process that calls ``predict``. MLflow's global switch still wins: after
``mlflow.tracing.disable()`` nothing is traced. When off, a request builds no span objects.

A request's trace has a root span (``lorax.chat``, type CHAT_MODEL, the request as inputs and the
response as outputs; attributes ``adapter_id``, ``prompt_tokens``, ``completion_tokens``,
``finish_reasons`` and MLflow's ``mlflow.chat.tokenUsage``) with four children in time order:

- ``template``: adapter resolution, chat-template rendering and tokenization;
- ``queue``: submitted to the engine -> first scheduled (the engine's RequestMetrics);
- ``prefill``: first scheduled -> first output token;
- ``decode``: first output token -> finished.

When a caller's span is active (e.g. inside an ``@mlflow.trace`` function), the root span is its child.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import mlflow
from mlflow.entities import SpanType
from mlflow.tracing.constant import SpanAttributeKey, TokenUsageKey
from mlflow.tracing.provider import is_tracing_enabled

from lorax_mlflow.engine.outputs import RequestOutput
from lorax_mlflow.redact import redact, redact_text

ENV_VAR = "LORAX_MLFLOW_TRACING"
ROOT_SPAN = "lorax.chat"
PHASE_SPANS = ("queue", "prefill", "decode")

_autolog_on = False


def autolog(disable: bool = False) -> None:
    """Trace every LoraxChatModel request of this process (``disable=True`` stops it)."""
    global _autolog_on
    _autolog_on = not disable


def enabled() -> bool:
    """Whether requests are traced now: switched on here or by the environment, and not disabled in MLflow."""
    switched_on = _autolog_on or os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
    return switched_on and is_tracing_enabled()


class RequestTrace:
    """The spans of one request. This base class records nothing: it is what requests get when tracing is off."""

    def template(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def finish(self, output: RequestOutput, response: dict[str, Any] | None = None) -> None:
        """End the trace (once: later finish or fail calls do nothing) with the engine's final output (``response``: the reply as sent, if built)."""

    def fail(self, error: BaseException) -> None:
        """End the trace with an error status."""


class _MlflowRequestTrace(RequestTrace):
    def __init__(self, name: str, inputs: dict[str, Any]) -> None:
        self._root = mlflow.start_span_no_context(
            ROOT_SPAN,
            span_type=SpanType.CHAT_MODEL,
            parent_span=mlflow.get_current_active_span(),
            inputs=redact(inputs),  # api_token, Authorization, AWS keys never reach a trace
            attributes={"method": name},
        )
        self._last_end_ns = self._root.start_time_ns
        self._ended = False

    @contextlib.contextmanager
    def template(self) -> Iterator[None]:
        span = mlflow.start_span_no_context("template", span_type=SpanType.PARSER, parent_span=self._root)
        try:
            yield
        except BaseException as error:
            span.record_exception(_redacted_error(error))
            span.end(status="ERROR")
            raise
        span.end()
        self._last_end_ns = span.end_time_ns

    def finish(self, output: RequestOutput, response: dict[str, Any] | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._phase_spans(output)
        prompt, completion = output.num_prompt_tokens, output.num_completion_tokens
        self._root.end(
            outputs=response if response is not None else _reply_of(output),
            attributes={
                "adapter_id": output.adapter_id or "",
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "finish_reasons": [choice.finish_reason for choice in output.outputs],
                SpanAttributeKey.CHAT_USAGE: {
                    TokenUsageKey.INPUT_TOKENS: prompt,
                    TokenUsageKey.OUTPUT_TOKENS: completion,
                    TokenUsageKey.TOTAL_TOKENS: prompt + completion,
                },
            },
        )

    def fail(self, error: BaseException) -> None:
        if self._ended:
            return
        self._ended = True
        self._root.record_exception(_redacted_error(error))
        self._root.end(status="ERROR")

    def _phase_spans(self, output: RequestOutput) -> None:
        metrics = output.metrics
        if metrics is None:
            return
        bounds = (metrics.arrival_time, metrics.first_scheduled_time, metrics.first_token_time, metrics.finished_time)
        attributes = ({}, {"prompt_tokens": output.num_prompt_tokens}, {"completion_tokens": output.num_completion_tokens})
        now_ns = time.time_ns()
        for name, start, end, extra in zip(PHASE_SPANS, bounds, bounds[1:], attributes):
            if start is None or end is None:
                continue
            # Engine timestamps are float seconds (about 0.2 us of rounding at today's epoch): clamp so
            # phases never overlap the template span or each other, nor run past now, by rounding alone.
            start_ns = min(max(int(start * 1e9), self._last_end_ns), now_ns)
            end_ns = min(max(int(end * 1e9), start_ns), now_ns)
            span = mlflow.start_span_no_context(
                name, span_type=SpanType.LLM, parent_span=self._root, attributes=extra, start_time_ns=start_ns
            )
            span.end(end_time_ns=end_ns)
            self._last_end_ns = end_ns


def _redacted_error(error: BaseException) -> str:
    return redact_text(f"{type(error).__name__}: {error}")


def _reply_of(output: RequestOutput) -> dict[str, Any]:
    """The streamed reply as one chat-completion-like object (for the root span's outputs)."""
    return {
        "model": output.adapter_id or "",
        "choices": [
            {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
             "finish_reason": choice.finish_reason}
            for choice in output.outputs
        ],
    }


_OFF = RequestTrace()


def start_request(name: str, inputs: dict[str, Any]) -> RequestTrace:
    """The trace of a request that is starting now (a recorder that does nothing when tracing is off)."""
    return _MlflowRequestTrace(name, inputs) if enabled() else _OFF

"""How many prefill tokens a step may carry while other sequences are decoding.

A step that carries decodes is a gap between two tokens of every decoding stream, so its prefill
share is what bounds their worst inter-token gap; the more prefill a step carries, the fewer steps
a long prompt needs, which bounds its time to first token under load. With a decode step costing
``d`` and a chunk of ``k`` prefill tokens ``k * c``, the gap grows by ``1 + k*c/d`` and the long
prompt's time to first token by ``1 + d/(k*c)``: both stay small when ``k*c`` is about twice ``d``.

The token count that achieves that depends on the model, the hardware and the batch, so it is
learned from measured step times (exponential moving averages of the decode-only step time and of
the time per prefill token) unless the configuration fixes it. With no decode running, a prefill
gets the whole step budget: nobody waits on it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_SMOOTHING = 0.3
_MIN_CHUNK = 32
_INITIAL_CHUNK = 256
"""Chunk used until both costs have been measured (a few steps)."""


class PrefillBudget:
    def __init__(self, max_num_batched_tokens: int, fixed_chunk: int | None, chunk_cost_ratio: float) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.fixed_chunk = fixed_chunk
        """Prefill tokens per step while decoding, when configured; None -> learned."""
        self.chunk_cost_ratio = chunk_cost_ratio
        """Target cost of a step's prefill share, in decode steps."""
        self.decode_step_s: float | None = None
        """Moving average of the duration of steps that carried only decodes."""
        self.prefill_token_s: float | None = None
        """Moving average of the time one prefill token adds to a step."""

    def tokens(self, num_decodes: int) -> int:
        """Prefill tokens the next step may hold, given how many decodes it carries."""
        if num_decodes == 0:
            return self.max_num_batched_tokens
        if self.fixed_chunk is not None:
            return min(self.fixed_chunk, self.max_num_batched_tokens)
        if self.decode_step_s is None or self.prefill_token_s is None:
            chunk = _INITIAL_CHUNK
        else:
            chunk = max(_MIN_CHUNK, int(self.chunk_cost_ratio * self.decode_step_s / self.prefill_token_s))
        return min(chunk, self.max_num_batched_tokens)

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Learn from one step: `num_decodes` one-token rows and `num_prefill_tokens` prefill tokens in `seconds`."""
        if logger.isEnabledFor(logging.DEBUG):  # the cost strings are built only when they are logged
            logger.debug("step: %d decodes, %d prefill tokens, %.1f ms (decode step %s ms, prefill token %s ms)",
                         num_decodes, num_prefill_tokens, 1000 * seconds, _ms(self.decode_step_s),
                         _ms(self.prefill_token_s))
        if num_prefill_tokens == 0:
            if num_decodes:
                self.decode_step_s = _average(self.decode_step_s, seconds)
            return
        decode_share = self.decode_step_s if num_decodes and self.decode_step_s is not None else 0.0
        if num_decodes and self.decode_step_s is None:
            return  # no decode estimate yet: cannot tell the prefill's share of this step
        per_token = max(seconds - decode_share, 0.1 * seconds) / num_prefill_tokens
        self.prefill_token_s = _average(self.prefill_token_s, per_token)


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1 - _SMOOTHING) * current + _SMOOTHING * sample


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{1000 * seconds:.1f}"

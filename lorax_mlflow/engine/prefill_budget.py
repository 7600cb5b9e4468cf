"""How many prefill tokens a step may carry while other sequences are decoding.

A step that carries decodes is a gap between two tokens of every decoding stream, so its prefill
share is what bounds their worst inter-token gap; the more prefill a step carries, the fewer steps
a long prompt needs, which bounds its time to first token under load. With a decode step costing
``d`` and a chunk of ``k`` prefill tokens ``k * c``, the gap grows by ``1 + k*c/d`` and the long
prompt's time to first token by ``1 + d/(k*c)``: both stay small when ``k*c`` is a few times ``d``
(`EngineConfig.prefill_chunk_cost_ratio`, measured there).

The token count that achieves that depends on the model, the hardware and the batch, so it is
learned from measured step times (`StepCostModel`: a decode step's cost for this many decodes, and
a prefill token's) unless the configuration fixes it. With no decode running, a prefill gets the
whole step budget: nobody waits on it.
"""

from __future__ import annotations

import logging

from lorax_mlflow.engine.step_cost import StepCostModel

logger = logging.getLogger(__name__)

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
        self.cost = StepCostModel()

    def tokens(self, num_decodes: int) -> int:
        """Prefill tokens the next step may hold, given how many decodes it carries."""
        if num_decodes == 0:
            return self.max_num_batched_tokens
        if self.fixed_chunk is not None:
            return min(self.fixed_chunk, self.max_num_batched_tokens)
        if not self.cost.ready:
            chunk = _INITIAL_CHUNK
        else:
            decode_step_s = self.cost.decode_step_s(num_decodes)
            chunk = max(_MIN_CHUNK, int(self.chunk_cost_ratio * decode_step_s / self.cost.prefill_token_s))
        return min(chunk, self.max_num_batched_tokens)

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Learn from one step: `num_decodes` one-token rows and `num_prefill_tokens` prefill tokens in `seconds`."""
        self.cost.observe(num_decodes, num_prefill_tokens, seconds)
        if logger.isEnabledFor(logging.DEBUG):  # the cost strings are built only when they are logged
            logger.debug("step: %d decodes, %d prefill tokens, %.1f ms (learned: decode step %.1f ms, prefill token "
                         "%.2f ms)", num_decodes, num_prefill_tokens, 1000 * seconds,
                         1000 * self.cost.decode_step_s(num_decodes), 1000 * self.cost.prefill_token_s)

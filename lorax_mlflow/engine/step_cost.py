"""A step's duration as a function of what it carries, learned online from measured steps.

    seconds ~= fixed + per_decode * decodes + per_prefill_token * prefill_tokens

`fixed` is mostly reading the weights (a CPU decode step is memory-bound), `per_decode` the rows
and attention of each decoding sequence, `per_prefill_token` a prefill token's share. A decode
step's cost depends on how many sequences decode (on this 2-core CPU, 1 decode ~90 ms, 16 ~200 ms),
so one average over decode-only steps is wrong whenever the batch changes, and it is never
refreshed while every step carries a prefill chunk (a long prompt under load): the fit uses every
step, mixed ones included.

Recursive least squares with forgetting (recent steps count more: the machine's speed drifts),
on relative errors (each step weighted by 1/seconds, so a 4-second prefill does not drown the
100-ms steps). Features are scaled to comparable magnitudes for a well-conditioned fit.
"""

from __future__ import annotations

_FORGETTING = 0.95
_PRIOR_VARIANCE = 1e4
_MAX_TRACE = 1e8  # stop forgetting in directions the recent steps do not excite (covariance wind-up)
_DECODE_SCALE = 16.0
_PREFILL_SCALE = 256.0


class StepCostModel:
    def __init__(self) -> None:
        self.theta = [0.0, 0.0, 0.0]  # fixed, per 16 decodes, per 256 prefill tokens (seconds)
        self.covariance = [[_PRIOR_VARIANCE if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.steps_with_decodes = 0
        self.steps_with_prefill = 0

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        if seconds <= 0 or num_decodes + num_prefill_tokens == 0:
            return
        x = [1.0 / seconds, num_decodes / _DECODE_SCALE / seconds, num_prefill_tokens / _PREFILL_SCALE / seconds]
        p = self.covariance
        px = [sum(p[i][j] * x[j] for j in range(3)) for i in range(3)]
        gain_denominator = _FORGETTING + sum(x[i] * px[i] for i in range(3))
        gain = [value / gain_denominator for value in px]
        error = 1.0 - sum(self.theta[i] * x[i] for i in range(3))  # target: seconds / seconds
        self.theta = [self.theta[i] + gain[i] * error for i in range(3)]
        forget = _FORGETTING if sum(p[i][i] for i in range(3)) < _MAX_TRACE else 1.0
        self.covariance = [[(p[i][j] - gain[i] * px[j]) / forget for j in range(3)] for i in range(3)]
        self.steps_with_decodes += num_decodes > 0
        self.steps_with_prefill += num_prefill_tokens > 0

    @property
    def ready(self) -> bool:
        """Whether the fit has seen both kinds of work and its costs are positive."""
        return (self.steps_with_decodes >= 2 and self.steps_with_prefill >= 2
                and self.prefill_token_s > 0)

    def decode_step_s(self, num_decodes: int) -> float:
        """Predicted duration of a step of `num_decodes` decodes and no prefill."""
        return self.theta[0] + self.theta[1] * num_decodes / _DECODE_SCALE

    @property
    def prefill_token_s(self) -> float:
        return self.theta[2] / _PREFILL_SCALE

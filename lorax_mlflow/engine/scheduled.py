"""What the scheduler hands the runner for one step: which sequences run and how many tokens each feeds.

Its own module so that the runner depends on this shape only, never on the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorax_mlflow.engine.sequence import Sequence


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    """Tokens fed this step; 0 for a sibling that reuses its parent's prefill logits."""
    logits_from: Sequence | None = None
    """For a sibling sharing its parent's prefill: whose last-token logits it samples from."""
    samples: bool = True
    """Whether this step produces a token for the sequence; False for a prefill chunk that does
    not reach the end of the sequence's tokens (it only fills the KV cache)."""
    draft_token_ids: list[int] = field(default_factory=list)
    """Speculative tokens fed after the sequence's last token (counted in `num_new_tokens`) for
    the step to verify."""

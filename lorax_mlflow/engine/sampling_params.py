"""Per-request generation parameters, validated once at submission (`EngineClient.validate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorax_mlflow.errors import InvalidRequestError

if TYPE_CHECKING:
    from lorax_mlflow.structured import Constraint

MAX_TOP_LOGPROBS = 20
MAX_LENGTH_PENALTY = 10.0
"""Beyond it length ** length_penalty overflows a float for long contexts (and no use is known)."""


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{param}: {message}", param=param)


@dataclass
class SamplingParams:
    """What to generate and how; names follow the OpenAI API (LoRAX names are mapped in api/generate_request.py)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None
    """None: no logprobs. 0: the chosen token's logprob. k>0: also the top-k alternatives."""
    prompt_logprobs: int | None = None
    """None: none. 0 or more: logprob of each prompt token (and top-k alternatives), for echo."""
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_output: Constraint | None = None
    """A grammar the output must match (JSON schema, regex, choice, EBNF, tool calls); None: free text."""
    use_beam_search: bool = False
    """Beam search of width `num_sequences` returning the `n` best beams (see engine/beam.py); the
    sampling fields then do not apply."""
    length_penalty: float = 1.0
    """Beam search: a finished beam scores cumulative_logprob / length ** length_penalty."""
    early_stopping: bool | str = False
    """Beam search: True, False or "never", as in transformers' generate."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_sequences(self) -> int:
        """How many sequences run for this request (best_of >= n)."""
        return self.best_of if self.best_of is not None else self.n

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first parameter that is out of range."""
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        _check(0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2]")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", "must be -1 (off) or >= 1")
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        _check(0.0 < self.typical_p <= 1.0, "typical_p", "must be in (0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "must be in (0, 2]")
        _check(1 <= self.n <= 16, "n", "must be in [1, 16]")
        if self.best_of is not None:
            _check(self.n <= self.best_of <= 16, "best_of", "must be in [n, 16]")
        if self.logprobs is not None:
            _check(0 <= self.logprobs <= MAX_TOP_LOGPROBS, "logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None:
            _check(
                0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                "prompt_logprobs",
                f"must be in [0, {MAX_TOP_LOGPROBS}]",
            )
        _check(len(self.stop) <= 16, "stop", "at most 16 stop strings")
        if self.use_beam_search:
            self._validate_beam_search()
        if self.seed is not None:
            _check(isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64, "seed",
                   "must be an integer in [-2^63, 2^64)")
        for bias in self.logit_bias.values():
            _check(-100.0 <= bias <= 100.0, "logit_bias", "biases must be in [-100, 100]")
        if vocab_size is not None:
            for tok in [*self.logit_bias, *self.stop_token_ids]:
                _check(0 <= tok < vocab_size, "logit_bias" if tok in self.logit_bias else "stop_token_ids",
                       f"token id {tok} is outside the vocabulary [0, {vocab_size})")

    def _validate_beam_search(self) -> None:
        _check(-MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY, "length_penalty",
               f"must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}]")
        _check(isinstance(self.early_stopping, bool) or self.early_stopping == "never", "early_stopping",
               'must be true, false or "never"')
        unsupported = {
            "stop": bool(self.stop),
            self.structured_output.param if self.structured_output is not None else "": self.structured_output,
        }
        for name, present in unsupported.items():
            _check(not present, name, "cannot be combined with use_beam_search")

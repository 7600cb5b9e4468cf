"""What crosses between the engine client and the engine core: msgspec structs, msgpack on the wire.

The core never unpickles anything: every message decodes into one of these typed structs (or
fails to decode). Outputs are batched per step: one :class:`EngineCoreOutputs` carries the new
tokens of every request that advanced in that step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError, LoraxError, error_from_fields

TopLogprobs = list[tuple[int, float]]
"""Top alternatives of one position: (token id, logprob), most likely first."""


class EngineInfo(msgspec.Struct, frozen=True):
    """What the client needs to know about the loaded core to validate and decode requests."""

    base_model_name: str
    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    eos_token_ids: list[int]


class WireError(msgspec.Struct, array_like=True, omit_defaults=True):
    """A LoraxError as data: its class name and fields."""

    kind: str
    message: str
    param: str | None = None
    code: str | None = None
    status: int = 400
    type: str = "invalid_request_error"

    @classmethod
    def of(cls, error: LoraxError) -> "WireError":
        return cls(type(error).__name__, error.message, error.param, error.code, error.status, error.type)

    def to_error(self) -> LoraxError:
        return error_from_fields(self.kind, self.message, param=self.param, code=self.code, status=self.status,
                                 type_=self.type)


class WireConstraint(msgspec.Struct, array_like=True):
    """A structured-output constraint (lorax_mlflow/structured) as its class name and fields."""

    kind: str
    fields: dict[str, Any]

    @classmethod
    def of(cls, constraint: Any) -> "WireConstraint":
        return cls(type(constraint).__name__, {f.name: getattr(constraint, f.name) for f in dataclasses.fields(constraint)})

    def to_constraint(self) -> Any:
        """Rebuilt from the known constraint classes only."""
        import lorax_mlflow.structured as structured

        if self.kind not in _CONSTRAINT_KINDS:
            raise InvalidRequestError(f"unknown structured output kind {self.kind!r}")
        kind = getattr(structured, self.kind)
        return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.fields.items()})


_CONSTRAINT_KINDS = ("ResponseFormat", "RegexConstraint", "ChoiceConstraint", "GrammarConstraint",
                     "StructuralTagConstraint")


class AddRequest(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    """SamplingParams fields but structured_output (see :func:`params_to_wire`)."""
    constraint: WireConstraint | None = None
    adapter_key: str | None = None
    """Cache key of an adapter the client resolved (its weights load in the core), None for the base model."""

    @classmethod
    def of(cls, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
           adapter_key: str | None) -> "AddRequest":
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "structured_output"}
        constraint = params.structured_output
        wire = None if constraint is None else WireConstraint.of(constraint)
        return cls(request_id, list(prompt_token_ids), fields, wire, adapter_key)

    def sampling_params(self) -> SamplingParams:
        """The request's SamplingParams (its constraint rebuilt from the known constraint classes only)."""
        constraint = None if self.constraint is None else self.constraint.to_constraint()
        return SamplingParams(**self.params, structured_output=constraint)


class AbortRequest(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    request_id: str
    indices: list[int] | None = None
    """Sequences of the request to stop (a stop string matched); None = the whole request."""


class UtilityCall(msgspec.Struct, tag=True, array_like=True):
    """A call of one of the core's utility methods (adapter resolution, stats), answered by UtilityResult."""

    call_id: int
    method: str
    args: list[Any]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


ClientMessage = AddRequest | AbortRequest | UtilityCall | Shutdown


class SequenceDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens of one sequence in one step."""

    index: int
    """Position of the sequence in its request (0 .. best_of-1)."""
    token_ids: list[int]
    logprobs: list[float]
    """Logprob of each new token under the raw model distribution."""
    top: list[TopLogprobs] | None = None
    """Per new token its top alternatives, when the request asked for `logprobs` > 0."""
    finish_reason: str | None = None
    draft_tokens: int = 0
    """Speculative draft tokens verified in this step, and how many of them were accepted."""
    accepted_draft_tokens: int = 0


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    sequences: list[SequenceDelta] = []
    prompt_logprobs: list[tuple[int, float, TopLogprobs] | None] | None = None
    """Sent once, with the first tokens: per prompt token (token, logprob, top), None for the first."""
    first_scheduled_time: float | None = None
    num_cached_tokens: int | None = None
    """Sent with `first_scheduled_time`: prompt tokens whose K/V came from the prefix cache."""
    """Sent once, when the request first entered a step."""
    error: WireError | None = None
    """The request failed in the core; nothing more will come for it."""


class EngineCoreOutputs(msgspec.Struct, tag=True, array_like=True):
    timestamp: float
    requests: list[RequestDelta]


class UtilityResult(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    error: WireError | None = None
    failure: str | None = None
    """An unexpected exception in the call, as text."""


class Ready(msgspec.Struct, tag=True, array_like=True):
    info: EngineInfo


class LoadFailed(msgspec.Struct, tag=True, array_like=True):
    message: str


CoreMessage = EngineCoreOutputs | UtilityResult | Ready | LoadFailed

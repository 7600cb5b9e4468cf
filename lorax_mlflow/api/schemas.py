"""Request bodies of every surface, as pydantic models: the one check of each field's JSON type.

FastAPI parses the HTTP bodies with them (they also make the OpenAPI schema); the ChatModel parses
its predict input with :class:`MlflowChatRequest` through :func:`parse_request`. So a field's type
is checked here and only here, for every surface. Values are checked where their meaning lives:
numeric ranges by `SamplingParams.validate` (in the engine client), `adapter_source` by
`AdapterRequest`, `merged_adapters` by `MergeSpec.from_dict`, structured outputs by
`structured/request.py`, tools by `tools/spec.py`, content parts by `chat/templates.py`; the schema
only documents those (`WithJsonSchema`). Unknown fields are rejected (400 naming the field);
fields that change nothing here (IgnoredFields) are accepted and only logged at debug level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

from lorax_mlflow.adapters.merge import MAJORITY_SIGN_METHODS, MERGE_STRATEGIES
from lorax_mlflow.adapters.sources import ADAPTER_SOURCES
from lorax_mlflow.errors import InvalidRequestError


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def to_body(self) -> dict[str, Any]:
        """Plain dict of the fields the client set (None = not set)."""
        return self.model_dump(exclude_none=True, by_alias=True)


AdapterSourceName = Annotated[str, WithJsonSchema({"type": "string", "enum": list(ADAPTER_SOURCES)})]
"""Checked by `AdapterRequest` (every caller of the engine names its adapter through one)."""

MergedAdaptersObject = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object",
    "required": ["ids"],
    "additionalProperties": False,
    "properties": {
        "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "weights": {"type": "array", "items": {"type": "number"}},
        "merge_strategy": {"type": "string", "enum": list(MERGE_STRATEGIES)},
        "density": {"type": "number"},
        "majority_sign_method": {"type": "string", "enum": list(MAJORITY_SIGN_METHODS)},
    },
})]
"""Checked by `MergeSpec.from_dict`, which names the field inside (merged_adapters.density...)."""


class LoraxExtensions(_Body):
    """LoRAX's per-request adapter fields, accepted at the top level of the OpenAI routes."""

    adapter_source: AdapterSourceName | None = None
    api_token: str | None = None
    merged_adapters: MergedAdaptersObject | None = None


class IgnoredFields(_Body):
    """Fields real clients send that change nothing server-side: accepted, logged at debug, unused.
    `reasoning_effort` included: the served models do not reason; `modalities` only as ["text"]."""

    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[Literal["text"]] | None = None

    def ignored(self) -> list[str]:
        return [name for name in IgnoredFields.model_fields if getattr(self, name) is not None]


class GenerationFields(LoraxExtensions, IgnoredFields):
    """Generation parameters shared by chat and completions (OpenAI names plus vLLM's extras)."""

    model: str = ""
    """Adapter id; "" or the base model's name selects the base model."""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    best_of: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    structured_outputs: dict[str, Any] | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessage(_Body):
    """Content parts other than text pass through to the one check that answers "text only"."""

    role: Literal["system", "user", "assistant", "tool", "developer"]
    """The one check of a message's role (`developer` is read as `system`)."""
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    """Response-message fields that clients echo back in the history; not shown to the model."""
    audio: None = None
    function_call: None = None
    """Only as null (the openai SDK may echo them back as such)."""


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage]
    """A string is read as one user message."""
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _one_user_message(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value


class CompletionRequest(GenerationFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None


class ResponseFormatLorax(_Body):
    type: Literal["json_object", "json_schema", "text"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: dict[str, Any] | None = None


class GenerateParameters(_Body):
    """LoRAX's /generate parameters, as the published lorax-client sends them."""

    adapter_id: str | None = None
    adapter_source: AdapterSourceName | None = None
    merged_adapters: MergedAdaptersObject | None = None
    api_token: str | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    ignore_eos_token: bool = False
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    truncate: int | None = None
    best_of: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = None
    response_format: ResponseFormatLorax | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None


class GenerateRequest(_Body):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class MlflowChatRequest(ChatCompletionRequest):
    """The ChatModel's input (predict, predict_stream, /invocations): MLflow's ChatParams and
    `custom_inputs` flattened into one chat body; `adapter_id` (not `model`) names the adapter. Fields
    it does not know are ignored, as MLflow's own ChatParams ignores them; `functions` /
    `function_call` are kept so that they get the "deprecated form of tools" answer."""

    model_config = ConfigDict(extra="ignore")
    adapter_id: str | None = None
    typical_p: float | None = None
    functions: list[Any] | None = None
    function_call: Any = None


GenerationFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
MlflowChatRequest.model_rebuild()

Request = TypeVar("Request", bound=BaseModel)


def parse_request(model: type[Request], body: Mapping[str, Any]) -> Request:
    """`body` as `model`, or the 400 the HTTP routes answer for the same body (see :func:`invalid_request`)."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise invalid_request(error.errors()) from error


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _union_member(part: Any) -> bool:
    """Pydantic puts the union member it tried into an error's location (`stop.list[str]`,
    `early_stopping.bool`): not part of the parameter's name."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part[:1].isupper())


def invalid_request(errors: list[Any]) -> InvalidRequestError:
    """The first pydantic error as a 400 naming the parameter (its dotted path inside the body)."""
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _union_member(part)]
    param = ".".join(loc) or None
    kind = first.get("type")
    if kind == "json_invalid":
        return InvalidRequestError(f"malformed JSON in the request body: {first.get('msg')}", code="invalid_json")
    if kind == "missing" and not loc:
        return InvalidRequestError("the request body must be a JSON object", code="invalid_json")
    if kind == "extra_forbidden":
        return InvalidRequestError(f"unsupported parameter: {param}", param=param, code="unsupported_parameter")
    if kind == "missing":
        return InvalidRequestError(f"missing required parameter: {param}", param=param)
    return InvalidRequestError(f"invalid value for {param}: {first.get('msg')}", param=param)

"""Request bodies of every route, as pydantic models (they also make the OpenAPI schema).

The models check shapes and types; ranges and cross-field rules live in one place,
`translate.sampling_params` / `SamplingParams.validate`, shared with the ChatModel. Unknown
fields are rejected (400 naming the field); fields that change nothing here (IgnoredFields) are
accepted and only logged at debug level.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_body(self) -> dict[str, Any]:
        """Plain dict of the fields the client set (None = not set), for the shared translation."""
        return self.model_dump(exclude_none=True, by_alias=True)


class MergedAdapters(_Body):
    ids: list[str]
    weights: list[float] | None = None
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] | None = None
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] | None = None


class LoraxExtensions(_Body):
    """LoRAX's per-request adapter fields, accepted at the top level of the OpenAI routes."""

    adapter_source: Literal["hub", "local", "s3", "mlflow"] | None = None
    api_token: str | None = None
    merged_adapters: MergedAdapters | None = None


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

    @field_validator("messages", mode="before")
    @classmethod
    def _one_user_message(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value
    logprobs: bool | None = None
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


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
    adapter_source: Literal["hub", "local", "s3", "mlflow"] | None = None
    merged_adapters: MergedAdapters | None = None
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


GenerationFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()

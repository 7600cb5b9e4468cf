"""The generation and adapter fields every OpenAI-shaped surface shares (chat, completions, the
MLflow ChatModel) -> SamplingParams and AdapterRequest.

Each field's type was checked by its schema (api/schemas.py); numeric ranges and token ids are
checked once, when the engine client validates the request (`EngineClient.validate`). What is left
here: the rules that tie fields together (top_logprobs needs logprobs, max_completion_tokens wins
over max_tokens, echo asks for prompt logprobs) and the conversions the engine needs (token-id keys,
stop strings as valid text).
"""

from __future__ import annotations

from typing import Protocol

from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.adapters.merge import MergeSpec
from lorax_mlflow.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationFields
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError, require_valid_text
from lorax_mlflow.structured.request import parse_structured_output

_SAME_NAME = ("temperature", "top_p", "top_k", "min_p", "typical_p", "n", "best_of", "seed", "presence_penalty",
              "frequency_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos", "skip_special_tokens",
              "spaces_between_special_tokens", "include_stop_str_in_output")
"""Fields that SamplingParams takes as they are (when set)."""


def sampling_params(
    request: GenerationFields, *, prompt_len: int, max_model_len: int, logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The request's SamplingParams; `logprobs` / `prompt_logprobs` as the surface reads them
    (:func:`chat_logprobs`, :func:`completion_logprobs`). Without max_tokens the completion may
    fill the context window. `use_beam_search` takes `best_of` (default `n`) as the width; streamed,
    the beams arrive whole in one chunk once the search ends."""
    kwargs = {name: getattr(request, name) for name in _SAME_NAME if getattr(request, name, None) is not None}
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    kwargs["max_tokens"] = max_tokens if max_tokens is not None else max(1, max_model_len - prompt_len)
    if request.stop is not None:
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        kwargs["stop"] = [require_valid_text(s, "stop") for s in stop]
    if request.logit_bias is not None:
        try:
            kwargs["logit_bias"] = {int(token): bias for token, bias in request.logit_bias.items()}
        except ValueError as error:
            raise InvalidRequestError("logit_bias must map token ids to numbers", param="logit_bias") from error
    if request.use_beam_search:  # without it length_penalty and early_stopping change nothing, as in vLLM
        kwargs["use_beam_search"] = True
        kwargs.update({name: getattr(request, name) for name in ("length_penalty", "early_stopping")
                       if getattr(request, name) is not None})
    return SamplingParams(**kwargs, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                          structured_output=parse_structured_output(request.to_body()))


def chat_logprobs(request: ChatCompletionRequest) -> int | None:
    """Chat's `logprobs: true` with `top_logprobs` alternatives (0 without)."""
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def completion_logprobs(request: CompletionRequest) -> tuple[int | None, int | None]:
    """Completions' `logprobs` alternatives, and the same for the prompt when `echo` shows it."""
    return request.logprobs, request.logprobs if request.echo else None


class AdapterFields(Protocol):
    adapter_source: str | None
    api_token: str | None
    merged_adapters: dict | None


def adapter_request(fields: AdapterFields, adapter_id: str, bearer_token: str | None = None) -> AdapterRequest:
    """LoRAX's adapter fields (`adapter_source`, `api_token`, `merged_adapters`) with the adapter
    the surface names (`model`, `adapter_id`); the request's `api_token` wins over the bearer token."""
    merged = None if fields.merged_adapters is None else MergeSpec.from_dict(fields.merged_adapters)
    return AdapterRequest(adapter_id=adapter_id, adapter_source=fields.adapter_source,
                          api_token=fields.api_token or bearer_token, merged_adapters=merged)


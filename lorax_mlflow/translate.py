"""OpenAI / LoRAX request fields -> engine inputs. Shared by every surface (MLflow, OpenAI, LoRAX)
so chat and completions behave the same everywhere."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lorax_mlflow.adapters.cache import AdapterRequest
from lorax_mlflow.adapters.merge import MergeSpec
from lorax_mlflow.adapters.sources import ADAPTER_SOURCES
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError, require_valid_text
from lorax_mlflow.structured.request import parse_structured_output

_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "typical_p")
_INT_FIELDS = ("top_k", "n", "best_of", "seed")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output")


def _number(body: Mapping[str, Any], name: str, kind: type) -> Any:
    """The field as `kind`; huge integers (10**400 is valid JSON) and NaN / infinity are 400s, never crashes."""
    value = body[name]
    wanted = "an integer" if kind is int else "a finite number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be {wanted}", param=name)
    if isinstance(value, float) and not (math.isfinite(value) and (kind is float or value.is_integer())):
        raise InvalidRequestError(f"{name} must be {wanted}", param=name)
    if kind is float and isinstance(value, int) and abs(value) > 2**63:
        raise InvalidRequestError(f"{name} is out of range", param=name)
    return kind(value)


def _present(body: Mapping[str, Any], name: str) -> bool:
    return body.get(name) is not None


def sampling_params(
    body: Mapping[str, Any], *, prompt_len: int, max_model_len: int, completions: bool = False
) -> SamplingParams:
    """Build validated SamplingParams from OpenAI request fields (chat or completions flavour)."""
    kwargs: dict[str, Any] = {}
    for name in _FLOAT_FIELDS:
        if _present(body, name):
            kwargs[name] = _number(body, name, float)
    for name in _INT_FIELDS:
        if _present(body, name):
            kwargs[name] = _number(body, name, int)
    for name in _BOOL_FIELDS:
        if _present(body, name):
            if not isinstance(body[name], bool):
                raise InvalidRequestError(f"{name} must be a boolean", param=name)
            kwargs[name] = body[name]
    max_tokens_field = "max_completion_tokens" if _present(body, "max_completion_tokens") else "max_tokens"
    if _present(body, max_tokens_field):
        kwargs["max_tokens"] = _number(body, max_tokens_field, int)
    else:
        kwargs["max_tokens"] = max(1, max_model_len - prompt_len)
    if _present(body, "stop"):
        stop = body["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
        kwargs["stop"] = [require_valid_text(s, "stop") for s in stop]
    if _present(body, "stop_token_ids"):
        ids = body["stop_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InvalidRequestError("stop_token_ids must be a list of integers", param="stop_token_ids")
        kwargs["stop_token_ids"] = ids
    if _present(body, "logit_bias"):
        bias = body["logit_bias"]
        if not isinstance(bias, Mapping):
            raise InvalidRequestError("logit_bias must map token ids to biases", param="logit_bias")
        try:
            kwargs["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError, OverflowError) as error:
            raise InvalidRequestError("logit_bias must map token ids to numbers", param="logit_bias") from error
    _logprobs(body, kwargs, completions)
    _beam_search(body, kwargs)
    kwargs["structured_output"] = parse_structured_output(body)
    params = SamplingParams(**kwargs)
    params.validate()
    return params


def _beam_search(body: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    """`use_beam_search` with `best_of` (default `n`) as the width. Without it `length_penalty` and
    `early_stopping` change nothing and are ignored, as in vLLM. Streamed, the beams arrive whole in
    one chunk once the search ends."""
    if not body.get("use_beam_search"):
        return
    kwargs["use_beam_search"] = True
    if _present(body, "length_penalty"):
        kwargs["length_penalty"] = _number(body, "length_penalty", float)
    if _present(body, "early_stopping"):
        kwargs["early_stopping"] = body["early_stopping"]


def _logprobs(body: Mapping[str, Any], kwargs: dict[str, Any], completions: bool) -> None:
    if completions:
        if _present(body, "logprobs"):
            kwargs["logprobs"] = _number(body, "logprobs", int)
        if body.get("echo") and _present(body, "logprobs"):
            kwargs["prompt_logprobs"] = kwargs["logprobs"]
        return
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequestError("logprobs must be a boolean on chat completions", param="logprobs")
    top = _number(body, "top_logprobs", int) if _present(body, "top_logprobs") else None
    if top is not None and not logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
    if logprobs:
        kwargs["logprobs"] = top or 0


def adapter_request(
    body: Mapping[str, Any], *, model_field: str | None, bearer_token: str | None = None
) -> AdapterRequest:
    """LoRAX adapter fields: `model` (OpenAI) or `adapter_id`, `adapter_source`, `api_token`, `merged_adapters`."""
    adapter_id = body.get("adapter_id") or model_field or ""
    if not isinstance(adapter_id, str):
        raise InvalidRequestError("adapter_id must be a string", param="adapter_id")
    source = body.get("adapter_source")
    if source is not None and source not in ADAPTER_SOURCES:
        raise InvalidRequestError(f"adapter_source must be one of {', '.join(ADAPTER_SOURCES)}", param="adapter_source")
    merged = body.get("merged_adapters")
    merge_spec = None
    if merged is not None:
        if not isinstance(merged, Mapping):
            raise InvalidRequestError("merged_adapters must be an object", param="merged_adapters")
        merge_spec = MergeSpec.from_dict(merged)
    token = body.get("api_token") or bearer_token
    return AdapterRequest(adapter_id=adapter_id, adapter_source=source, api_token=token, merged_adapters=merge_spec)

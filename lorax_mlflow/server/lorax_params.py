"""LoRAX /generate parameters -> SamplingParams, through the same translation as the OpenAI routes.

LoRAX (like TGI) decodes greedily unless `do_sample` is set or a sampling warper (temperature,
top_k, top_p, typical_p) is given. When it samples without a seed it draws one and reports it in
`details.seed`, so the result can be reproduced.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.server.schemas import GenerateParameters
from lorax_mlflow.translate import sampling_params

ADAPTER_FIELDS = ("adapter_id", "adapter_source", "api_token", "merged_adapters")
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def samples(parameters: GenerateParameters) -> bool:
    warped = (
        (parameters.temperature is not None and parameters.temperature != 1.0)
        or parameters.top_k is not None
        or (parameters.top_p is not None and parameters.top_p < 1.0)
        or (parameters.typical_p is not None and parameters.typical_p < 1.0)
    )
    return (parameters.do_sample or warped) and parameters.temperature != 0.0


def check_supported(parameters: GenerateParameters, *, stream: bool) -> None:
    """Reject what this server cannot honour, as LoRAX's own validation does."""
    if parameters.watermark:
        raise InvalidRequestError("watermark is not supported by this server", param="watermark")
    if parameters.truncate is not None and parameters.truncate < 1:
        raise InvalidRequestError("truncate must be >= 1", param="truncate")
    best_of = parameters.best_of or 1
    if best_of > 1 and stream:
        raise InvalidRequestError("best_of > 1 is not supported when streaming", param="best_of")
    if best_of > 1 and not samples(parameters):
        raise InvalidRequestError("best_of > 1 needs sampling (do_sample or a sampling parameter)", param="best_of")
    if best_of > 1 and parameters.seed is not None:
        raise InvalidRequestError("seed must not be set when best_of > 1", param="seed")
    if parameters.return_k_alternatives is not None and parameters.return_k_alternatives < 1:
        raise InvalidRequestError("return_k_alternatives must be >= 1", param="return_k_alternatives")


def generate_sampling_params(parameters: GenerateParameters, *, stream: bool, max_model_len: int) -> SamplingParams:
    """Validated SamplingParams for a /generate request (max_tokens is fitted to the prompt later)."""
    check_supported(parameters, stream=stream)
    sampling = samples(parameters)
    body: dict[str, Any] = {
        "temperature": (parameters.temperature or 1.0) if sampling else 0.0,
        "top_k": parameters.top_k if sampling else None,
        "top_p": parameters.top_p if sampling else None,
        "typical_p": parameters.typical_p if sampling else None,
        "seed": parameters.seed if parameters.seed is not None or not sampling else random.randrange(2**31),
        "repetition_penalty": parameters.repetition_penalty,
        "frequency_penalty": parameters.frequency_penalty,
        "presence_penalty": parameters.presence_penalty,
        "stop": parameters.stop or None,
        "ignore_eos": parameters.ignore_eos_token,
        "max_tokens": parameters.max_new_tokens,
        "n": parameters.best_of or 1,
        "response_format": parameters.response_format.to_body() if parameters.response_format else None,
        **{name: getattr(parameters, name) for name in GUIDED_FIELDS},
    }
    if parameters.details or stream:  # token logprobs are part of LoRAX's token objects
        body["logprobs"] = parameters.return_k_alternatives or 0
    params = sampling_params(body, prompt_len=0, max_model_len=max_model_len, completions=True)
    if parameters.decoder_input_details:
        params = dataclasses.replace(params, prompt_logprobs=0)
    return params


def fit_to_prompt(params: SamplingParams, parameters: GenerateParameters, prompt_len: int,
                  max_model_len: int) -> SamplingParams:
    """Without max_new_tokens LoRAX generates up to the end of the context window."""
    if parameters.max_new_tokens is not None:
        return params
    return dataclasses.replace(params, max_tokens=max(1, max_model_len - prompt_len))


def adapter_body(parameters: GenerateParameters) -> dict[str, Any]:
    return {k: v for k, v in parameters.to_body().items() if k in ADAPTER_FIELDS}

"""The LoRAX request builder: /generate, /generate_stream and `/` -> one PreparedRequest.

LoRAX (like TGI) decodes greedily unless `do_sample` is set or a sampling warper (temperature,
top_k, top_p, typical_p) is given. When it samples without a seed it draws one and reports it in
`details.seed`, so the result can be reproduced. Without max_new_tokens it generates up to the end
of the context window; `truncate` keeps the prompt's last tokens.
"""

from __future__ import annotations

import random
from typing import Any

from lorax_mlflow.api.fields import adapter_request
from lorax_mlflow.api.schemas import GenerateParameters, GenerateRequest
from lorax_mlflow.engine.sampling_params import SamplingParams
from lorax_mlflow.errors import InvalidRequestError, require_valid_text
from lorax_mlflow.service import LoraxService, PreparedRequest
from lorax_mlflow.structured.request import parse_structured_output

_STRUCTURED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def generate_request(
    service: LoraxService, request: GenerateRequest, *, stream: bool, bearer_token: str | None = None
) -> PreparedRequest:
    parameters = request.parameters
    _check_supported(parameters, stream=stream)
    adapter = service.engine.adapters.resolve(adapter_request(parameters, parameters.adapter_id or "", bearer_token))
    prompt = service.templates.tokenizer_for(adapter.folder).encode(require_valid_text(request.inputs, "inputs"))
    if parameters.truncate is not None:
        prompt = prompt[-parameters.truncate:]
    max_tokens = parameters.max_new_tokens
    if max_tokens is None:
        max_tokens = max(1, service.engine.max_model_len - len(prompt))
    params = _sampling_params(parameters, max_tokens=max_tokens, stream=stream)
    return PreparedRequest(prompt, params, adapter, model=adapter.adapter_id or service.base_model_name)


def _samples(parameters: GenerateParameters) -> bool:
    warped = (
        (parameters.temperature is not None and parameters.temperature != 1.0)
        or parameters.top_k is not None
        or (parameters.top_p is not None and parameters.top_p < 1.0)
        or (parameters.typical_p is not None and parameters.typical_p < 1.0)
    )
    return (parameters.do_sample or warped) and parameters.temperature != 0.0


def _check_supported(parameters: GenerateParameters, *, stream: bool) -> None:
    """Reject what this server cannot honour, as LoRAX's own validation does."""
    if parameters.watermark:
        raise InvalidRequestError("watermark is not supported by this server", param="watermark")
    if parameters.truncate is not None and parameters.truncate < 1:
        raise InvalidRequestError("truncate must be >= 1", param="truncate")
    best_of = parameters.best_of or 1
    if best_of > 1 and stream:
        raise InvalidRequestError("best_of > 1 is not supported when streaming", param="best_of")
    if best_of > 1 and not _samples(parameters):
        raise InvalidRequestError("best_of > 1 needs sampling (do_sample or a sampling parameter)", param="best_of")
    if best_of > 1 and parameters.seed is not None:
        raise InvalidRequestError("seed must not be set when best_of > 1", param="seed")
    if parameters.return_k_alternatives is not None and parameters.return_k_alternatives < 1:
        raise InvalidRequestError("return_k_alternatives must be >= 1", param="return_k_alternatives")


def _sampling_params(parameters: GenerateParameters, *, max_tokens: int, stream: bool) -> SamplingParams:
    sampling = _samples(parameters)
    kwargs: dict[str, Any] = {
        name: getattr(parameters, name) for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")
        if getattr(parameters, name) is not None
    }
    if sampling:
        kwargs.update({name: getattr(parameters, name) for name in ("top_k", "top_p", "typical_p")
                       if getattr(parameters, name) is not None})
    structured = {name: getattr(parameters, name) for name in _STRUCTURED_FIELDS}
    if parameters.response_format is not None:
        structured["response_format"] = parameters.response_format.to_body()
    return SamplingParams(
        **kwargs,
        temperature=(parameters.temperature or 1.0) if sampling else 0.0,
        seed=parameters.seed if parameters.seed is not None or not sampling else random.randrange(2**31),
        stop=[require_valid_text(s, "stop") for s in parameters.stop],
        ignore_eos=parameters.ignore_eos_token,
        max_tokens=max_tokens,
        n=parameters.best_of or 1,
        # token logprobs are part of LoRAX's token objects
        logprobs=(parameters.return_k_alternatives or 0) if parameters.details or stream else None,
        prompt_logprobs=0 if parameters.decoder_input_details else None,
        structured_output=parse_structured_output(structured),
    )

"""The OpenAI completions request builder: /v1/completions -> one PreparedRequest per prompt.

`prompt` is a string, a list of strings, a list of token ids, or a list of token id lists (its
schema checks which); the prompts share the adapter, and each gets its own SamplingParams (the
default max_tokens fills what its prompt leaves of the context window).
"""

from __future__ import annotations

from lorax_mlflow.api.fields import adapter_request, completion_logprobs, sampling_params
from lorax_mlflow.api.schemas import CompletionRequest
from lorax_mlflow.engine.config import EngineConfig
from lorax_mlflow.errors import InvalidRequestError, require_valid_text
from lorax_mlflow.service import LoraxService, PreparedRequest


def completion_requests(
    service: LoraxService, request: CompletionRequest, *, bearer_token: str | None = None
) -> list[PreparedRequest]:
    prompts = _prompts(request.prompt)
    _check_request_size(service.engine.config, prompts, request)
    adapter = service.engine.adapters.resolve(adapter_request(request, request.model, bearer_token))
    tokenizer = service.templates.tokenizer_for(adapter.folder)
    logprobs, prompt_logprobs = completion_logprobs(request)
    prepared = []
    for prompt in prompts:
        ids = tokenizer.encode(require_valid_text(prompt, "prompt")) if isinstance(prompt, str) else prompt
        params = sampling_params(request, prompt_len=len(ids), max_model_len=service.engine.max_model_len,
                                 logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        text = prompt if request.echo and isinstance(prompt, str) else None
        prepared.append(PreparedRequest(ids, params, adapter, model=request.model or service.base_model_name,
                                        prompt_text=text))
    return prepared


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    return list(prompt)


def _check_request_size(config: EngineConfig, prompts: list, request: CompletionRequest) -> None:
    """Caps on prompts per request and on the sequences they start (prompts x max(n, best_of))."""
    if len(prompts) > config.max_prompts_per_request:
        raise InvalidRequestError(
            f"prompt: at most {config.max_prompts_per_request} prompts per request, got {len(prompts)}",
            param="prompt",
        )
    per_prompt = max(request.n or 1, request.best_of or 1)
    if len(prompts) * per_prompt > config.max_sequences_per_request:
        raise InvalidRequestError(
            f"n: {len(prompts)} prompts x {per_prompt} sequences each is above this server's limit of "
            f"{config.max_sequences_per_request} sequences per request", param="n",
        )

"""Text-completion responses and stream chunks (OpenAI `text_completion`), several prompts per request."""

from __future__ import annotations

from typing import Any

from lorax_mlflow import openai_format
from lorax_mlflow.engine.outputs import RequestOutput


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def text_completion(
    request_id: str, model: str, created: int, choices: list[dict[str, Any]], usage: dict[str, int] | None
) -> dict[str, Any]:
    return openai_format.envelope("text_completion", completion_id(request_id), model, created, choices, usage)


def summed_usage(outputs: list[RequestOutput]) -> dict[str, int]:
    """Usage of a request with several prompts: the sum over its engine requests."""
    prompt = sum(o.num_prompt_tokens for o in outputs)
    completion = sum(o.num_completion_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice_index(prompt_index: int, n: int, index: int) -> int:
    """Choices of prompt i occupy indices i*n .. i*n+n-1, as in OpenAI's API."""
    return prompt_index * n + index

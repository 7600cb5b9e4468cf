"""What the OpenAI wire formats (chat, completions) share: the response envelope, the one `usage`
builder, token logprobs."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lorax_mlflow.engine.outputs import RequestOutput, TokenLogprob


def usage(*outputs: RequestOutput) -> dict[str, Any]:
    """OpenAI usage of one engine request, or the sum over several (a completion of several prompts).

    ``prompt_tokens_details.cached_tokens``: prompt tokens whose K/V came from the prefix cache.
    """
    prompt = sum(o.num_prompt_tokens for o in outputs)
    completion = sum(o.num_completion_tokens for o in outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)},
    }


def envelope(
    object_type: str, response_id: str, model: str, created: int, choices: list[dict[str, Any]],
    usage_: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields every OpenAI response object shares; `usage` only when given."""
    body: dict[str, Any] = {"id": response_id, "object": object_type, "created": created, "model": model,
                            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
        ]
    }


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob | None], start_offset: int = 0
) -> dict[str, Any]:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for entry in entries:
        if entry is None:  # the first prompt token has no logprob
            continue
        text = token_text(tokenizer, entry.token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        top_logprobs.append({token_text(tokenizer, t): lp for t, lp in entry.top} or None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}

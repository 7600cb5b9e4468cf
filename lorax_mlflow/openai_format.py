"""Engine outputs -> OpenAI JSON (chat completions, chunks, text completions, logprobs)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lorax_mlflow.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob


def usage(output: RequestOutput) -> dict[str, int]:
    prompt, completion = output.num_prompt_tokens, output.num_completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
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
        text = _token_text(tokenizer, entry.token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        top_logprobs.append({_token_text(tokenizer, t): lp for t, lp in entry.top} or None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_completion(
    output: RequestOutput, *, model: str, created: int, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    choices = [
        {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "finish_reason": choice.finish_reason,
            "logprobs": None if choice.logprobs is None else chat_logprobs(tokenizer, choice.logprobs),
        }
        for choice in output.outputs
    ]
    return envelope("chat.completion", f"chatcmpl-{output.request_id}", model, created, choices, usage(output))


def envelope(
    object_type: str, response_id: str, model: str, created: int, choices: list[dict[str, Any]],
    usage_: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The fields every OpenAI response object shares; `usage` only when given."""
    body: dict[str, Any] = {"id": response_id, "object": object_type, "created": created, "model": model,
                            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_chunk(
    request_id: str, model: str, created: int, choices: list[dict[str, Any]], usage_: dict | None = None
) -> dict[str, Any]:
    return envelope("chat.completion.chunk", f"chatcmpl-{request_id}", model, created, choices, usage_)


def chat_delta_choices(
    output: RequestOutput, tokenizer: PreTrainedTokenizerBase, *, first: bool
) -> list[dict[str, Any]]:
    """One streamed step: per choice a content delta (the first one also carries the role)."""
    choices = []
    for choice in output.outputs:
        if not first and not choice.delta_text and choice.finish_reason is None:
            continue
        delta: dict[str, Any] = {"role": "assistant", "content": choice.delta_text} if first else {}
        if not first and choice.delta_text:
            delta["content"] = choice.delta_text
        choices.append(
            {
                "index": choice.index,
                "delta": delta,
                "finish_reason": choice.finish_reason,
                "logprobs": chat_logprobs(tokenizer, choice.delta_logprobs) if choice.logprobs is not None else None,
            }
        )
    return choices


def text_completion_choice(
    choice: CompletionOutput,
    *,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str | None = None,
    prompt_logprobs: list[TokenLogprob | None] | None = None,
    suffix: str | None = None,
    delta: bool = False,
) -> dict[str, Any]:
    text = choice.delta_text if delta else choice.text
    logprobs = None
    if choice.logprobs is not None:
        entries = list(choice.delta_logprobs if delta else choice.logprobs)
        prefix: list[TokenLogprob | None] = list(prompt_logprobs or []) if prompt_text is not None else []
        logprobs = completion_logprobs(tokenizer, prefix + entries)
    if prompt_text is not None:
        text = prompt_text + text
    if suffix and choice.finish_reason is not None:
        text += suffix
    return {"index": index, "text": text, "finish_reason": choice.finish_reason, "logprobs": logprobs}

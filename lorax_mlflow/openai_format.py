"""Engine outputs -> OpenAI JSON (chat completions, chunks, text completions, logprobs)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lorax_mlflow.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from lorax_mlflow.tools import hermes
from lorax_mlflow.tools.spec import ToolRequest


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


def _finish_reason(choice: CompletionOutput, called: bool) -> str | None:
    """"tool_calls" when the model ended its turn after calling; "length" stays "length"."""
    return "tool_calls" if called and choice.finish_reason == "stop" else choice.finish_reason


def chat_message(choice: CompletionOutput, tools: ToolRequest | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice and its finish_reason; with tools, the calls
    parsed out of the text go to `tool_calls` and the rest stays `content` (None when empty)."""
    if tools is None:
        return {"role": "assistant", "content": choice.text}, choice.finish_reason
    parsed = hermes.parse(choice.text, tools)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content}
    if parsed.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
    return message, _finish_reason(choice, bool(parsed.tool_calls))


def chat_completion(
    output: RequestOutput, *, model: str, created: int, tokenizer: PreTrainedTokenizerBase,
    tools: ToolRequest | None = None,
) -> dict[str, Any]:
    choices = []
    for choice in output.outputs:
        message, finish_reason = chat_message(choice, tools)
        choices.append({
            "index": choice.index,
            "message": message,
            "finish_reason": finish_reason,
            "logprobs": None if choice.logprobs is None else chat_logprobs(tokenizer, choice.logprobs),
        })
    return envelope("chat.completion", f"chatcmpl-{output.request_id}", model, created, choices, usage(output))


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


def chat_chunk(
    request_id: str, model: str, created: int, choices: list[dict[str, Any]], usage_: dict | None = None
) -> dict[str, Any]:
    return envelope("chat.completion.chunk", f"chatcmpl-{request_id}", model, created, choices, usage_)


class ChatDeltas:
    """The chunk choices of one streamed chat request, output after output.

    The first chunk of each choice carries the role. With tools, each call goes out whole in one
    `delta.tool_calls` entry as soon as its block closes: `{index, id, type, function: {name,
    arguments}}` with `index` counting the choice's calls, which is how the openai SDK and
    LangChain accumulate calls; content around the calls streams as `content`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tools: ToolRequest | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools
        self._started: set[int] = set()
        self._parsers: dict[int, hermes.StreamParser] = {}
        self._calls: dict[int, int] = {}

    def choices(self, output: RequestOutput) -> list[dict[str, Any]]:
        choices = []
        for choice in output.outputs:
            first = choice.index not in self._started
            self._started.add(choice.index)
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            self._add_text(delta, choice)
            if not first and not delta and choice.finish_reason is None and not choice.delta_logprobs:
                continue
            called = self._calls.get(choice.index, 0) > 0
            choices.append({
                "index": choice.index,
                "delta": delta,
                "finish_reason": _finish_reason(choice, called) if choice.finish_reason else None,
                "logprobs": chat_logprobs(self.tokenizer, choice.delta_logprobs) if choice.logprobs is not None else None,
            })
        return choices

    def _add_text(self, delta: dict[str, Any], choice: CompletionOutput) -> None:
        if self.tools is None:
            if choice.delta_text:
                delta["content"] = choice.delta_text
            return
        parser = self._parsers.setdefault(choice.index, hermes.StreamParser(self.tools))
        events = parser.feed(choice.delta_text)
        if choice.finish_reason is not None:
            events += parser.finish()
        content = "".join(e for e in events if isinstance(e, str))
        if content:
            delta["content"] = delta.get("content", "") + content
        calls = []
        for call in (e for e in events if isinstance(e, hermes.ToolCall)):
            index = self._calls.get(choice.index, 0)
            self._calls[choice.index] = index + 1
            calls.append({"index": index, **call.to_openai()})
        if calls:
            delta["tool_calls"] = calls


def text_completion(
    request_id: str, model: str, created: int, choices: list[dict[str, Any]], usage_: dict[str, int] | None
) -> dict[str, Any]:
    return envelope("text_completion", f"cmpl-{request_id}", model, created, choices, usage_)


def choice_index(prompt_index: int, n: int, index: int) -> int:
    """Choices of prompt i occupy indices i*n .. i*n+n-1, as in OpenAI's API."""
    return prompt_index * n + index


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

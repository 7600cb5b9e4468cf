"""The OpenAI chat wire format: engine outputs -> chat.completion responses and chat.completion.chunk
events (tool calls parsed out of the text), for /v1/chat/completions and the MLflow ChatModel."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from lorax_mlflow.api.openai_common import chat_logprobs, envelope, usage
from lorax_mlflow.engine.outputs import CompletionOutput, RequestOutput
from lorax_mlflow.service import PreparedRequest
from lorax_mlflow.tools import hermes
from lorax_mlflow.tools.spec import ToolRequest


class ChatFormatter:
    """One chat request's wire format: the whole response, or the stream's chunks one output at a
    time (then the usage chunk, when the client asked for it)."""

    def __init__(self, prepared: PreparedRequest, tokenizer: PreTrainedTokenizerBase, created: int) -> None:
        self.model = prepared.model
        self.tools = prepared.tools
        self.tokenizer = tokenizer
        self.created = created
        self._deltas = ChatDeltas(tokenizer, prepared.tools)

    def response(self, output: RequestOutput) -> dict[str, Any]:
        choices = []
        for choice in output.outputs:
            message, finish_reason = chat_message(choice, self.tools)
            choices.append({
                "index": choice.index,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": None if choice.logprobs is None else chat_logprobs(self.tokenizer, choice.logprobs),
            })
        return envelope("chat.completion", f"chatcmpl-{output.request_id}", self.model, self.created, choices,
                        usage(output))

    def chunk(self, output: RequestOutput) -> dict[str, Any] | None:
        """The chunk for the next output of the stream; None when it adds nothing to send."""
        choices = self._deltas.choices(output)
        return self._chunk(output.request_id, choices) if choices else None

    def usage_chunk(self, output: RequestOutput) -> dict[str, Any]:
        """`stream_options.include_usage`: a last chunk without choices."""
        return self._chunk(output.request_id, [], usage(output))

    def _chunk(self, request_id: str, choices: list[dict[str, Any]], usage_: dict | None = None) -> dict[str, Any]:
        return envelope("chat.completion.chunk", f"chatcmpl-{request_id}", self.model, self.created, choices, usage_)


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

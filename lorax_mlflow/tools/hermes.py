"""The Hermes tool-call format (Hermes, Qwen 2.5/3, and our fallback prompt): one block per call,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

with blocks separated by a newline. This module writes calls in that format (history), builds the
grammar that forces calls (tool_choice "required" or a named function), and parses calls out of
generated text, whole or streamed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorax_mlflow.structured.constraints import StructuralTagConstraint, json_grammar_ebnf
from lorax_mlflow.tools.spec import ToolRequest

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
SEPARATOR = "\n"
MAX_FORCED_CALLS = 4


@dataclass
class ToolCall:
    name: str
    arguments: str
    """The arguments as a JSON text (OpenAI's shape)."""
    id: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def render_call(name: str, arguments: Mapping[str, Any]) -> str:
    """One call as the model writes it (for assistant turns in the history)."""
    body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def forced_call_constraint(tools: ToolRequest) -> StructuralTagConstraint:
    """A grammar whose sentences are one call (with parallel_tool_calls, up to MAX_FORCED_CALLS
    calls, newline-separated) of the offered functions, each with arguments valid against its
    parameters: the text always parses. The cap keeps a model that never chooses to stop (a small
    or random one) from calling until max_tokens cuts a call in half."""
    tags = []
    for function in tools.offered:
        begin = f'{OPEN}\n{{"name": {json.dumps(function.name)}, "arguments": '
        tags.append({
            "type": "tag",
            "begin": begin,
            "content": {"type": "grammar", "grammar": json_grammar_ebnf(function.parameters)},
            "end": f"}}\n{CLOSE}",
        })
    one_call = {"type": "or", "elements": tags}
    calls = one_call
    if tools.parallel and tools.choice != "function":
        more = {"type": "sequence", "elements": [{"type": "const_string", "value": SEPARATOR}, one_call]}
        calls = {"type": "sequence", "elements": [
            one_call, {"type": "repeat", "min": 0, "max": MAX_FORCED_CALLS - 1, "content": more}]}
    return StructuralTagConstraint(json.dumps({"type": "structural_tag", "format": calls}, sort_keys=True))


def _call(block: str, tools: ToolRequest) -> ToolCall | None:
    """The call written in one block, or None when it is not a JSON call of an offered function."""
    try:
        value = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or tools.function(value.get("name")) is None:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False), new_call_id())


@dataclass
class ParsedMessage:
    content: str | None
    tool_calls: list[ToolCall]


def parse(text: str, tools: ToolRequest) -> ParsedMessage:
    """Split generated text into content and calls. A block that does not parse as a call of an
    offered function stays in the content, as written."""
    parser = StreamParser(tools)
    events = parser.feed(text) + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ToolCall)]
    return ParsedMessage(content or None, calls)


class StreamParser:
    """Incremental :func:`parse`: feed text deltas, get content strings and complete ToolCalls.

    Text that may be the start of ``<tool_call>`` is held back until it is known not to be;
    whitespace next to calls is dropped (content is what the model said besides its calls).
    """

    def __init__(self, tools: ToolRequest) -> None:
        self.tools = tools
        self._buffer = ""
        self._in_call = False
        self._held_space = ""
        self._said_something = False

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buffer += text
        events: list[str | ToolCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return events
                block, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE):]
                self._in_call = False
                call = _call(block, self.tools)
                if call is None:
                    events += self._content(OPEN + block + CLOSE)
                else:
                    self._held_space = ""
                    events.append(call)
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                events += self._content(self._buffer[:start])
                self._buffer = self._buffer[start + len(OPEN):]
                self._in_call = True
                continue
            keep = _partial_open_length(self._buffer)
            ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
            events += self._content(ready)
            return events

    def finish(self) -> list[str | ToolCall]:
        """The rest once generation ended: an unfinished block is content, as written."""
        rest = (OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return self._content(rest)

    def _content(self, text: str) -> list[str | ToolCall]:
        if not text:
            return []
        if not text.strip():
            self._held_space += text
            return []
        if not self._said_something:
            text = text.lstrip()
        out = self._held_space + text if self._said_something else text
        stripped = out.rstrip()
        self._held_space = out[len(stripped):]
        self._said_something = True
        return [stripped] if stripped else []


def _partial_open_length(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of ``<tool_call>``."""
    for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-length:]):
            return length
    return 0

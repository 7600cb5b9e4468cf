"""How tools and tool turns reach the chat template.

A template that takes `tools` and writes Hermes ``<tool_call>`` blocks (Hermes, Qwen 2.5/3) renders
them itself: it gets `tools=[...]`, assistant turns with `tool_calls` and `tool` turns as they are.
Any other template gets the fallback format, which needs nothing from it:

- the tool list goes into the system message (appended to the first one, or a new one in front):
  the functions as JSON lines inside ``<tools></tools>``, and how to call them;
- an assistant turn's calls become ``<tool_call>`` blocks after its content;
- `tool` turns become user turns holding ``<tool_response>`` blocks (consecutive ones merged), so
  templates that know only system/user/assistant, or insist that user and assistant alternate,
  still render them.

Either way the model answers in the Hermes format (tools/hermes.py parses it).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta

from lorax_mlflow.tools.hermes import OPEN, render_call
from lorax_mlflow.tools.spec import ToolRequest

FALLBACK_INSTRUCTIONS = (
    "You can call functions to answer. Their signatures are listed inside <tools></tools>, one JSON "
    "object per line:\n<tools>\n{tools}\n</tools>\n\n"
    "To call functions, reply with one <tool_call></tool_call> block per call, each holding a JSON "
    "object with the function's name and its arguments:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": <arguments as a JSON object>}}\n</tool_call>'
)


@lru_cache(maxsize=64)
def renders_hermes_tools(template: str) -> bool:
    """Whether the template reads `tools` and writes ``<tool_call>`` blocks itself."""
    try:
        variables = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in variables and OPEN in template


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    arguments = (call.get("function") or {}).get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return {"_raw": arguments}
    return arguments if isinstance(arguments, dict) else {"_value": arguments}


def native_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tools: call arguments as objects (what HF templates expect)."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{"type": "function", "id": c.get("id"),
                      "function": {"name": (c.get("function") or {}).get("name"), "arguments": _arguments(c)}}
                     for c in message["tool_calls"]]
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def fallback_messages(messages: list[dict[str, Any]], tools: ToolRequest | None) -> list[dict[str, Any]]:
    """Messages in the fallback format (see the module docstring), for any template."""
    out: list[dict[str, Any]] = []
    merging_responses = False
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if merging_responses:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            merging_responses = True
            continue
        merging_responses = False
        rendered = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        calls = [render_call((c.get("function") or {}).get("name"), _arguments(c))
                 for c in message.get("tool_calls") or []]
        if calls:
            rendered["content"] = "\n".join(filter(None, [rendered.get("content") or "", *calls]))
        out.append(rendered)
    if tools is not None:
        listing = "\n".join(json.dumps(f.to_openai(), ensure_ascii=False) for f in tools.functions)
        instructions = FALLBACK_INSTRUCTIONS.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{instructions}"}
        else:
            out.insert(0, {"role": "system", "content": instructions})
    return out

"""A request's `tools`, `tool_choice` and `parallel_tool_calls` -> one validated ToolRequest."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.structured.response_format import load_schema

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters_json: str
    """The parameters' JSON schema as canonical JSON text (frozen, hashable, picklable)."""

    @property
    def parameters(self) -> dict[str, Any]:
        return json.loads(self.parameters_json)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI tool shape that chat templates and the fallback prompt show the model."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolRequest:
    """The functions a request offers and what the model must do with them.

    `choice`: "auto" (answer or call), "required" (at least one call), or "function" (call
    `forced_name`). "none" never becomes a ToolRequest: the tools are then neither shown nor parsed.
    """

    functions: tuple[Function, ...]
    choice: str
    forced_name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def offered(self) -> tuple[Function, ...]:
        """The functions a forced call may use."""
        if self.forced_name is None:
            return self.functions
        return tuple(f for f in self.functions if f.name == self.forced_name)

    def function(self, name: str) -> Function | None:
        return next((f for f in self.functions if f.name == name), None)


def _function(tool: Any, index: int) -> Function:
    where = f"tools[{index}]"
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        raise InvalidRequestError(f"{where} must be a function tool ({{'type': 'function', 'function': ...}})",
                                  param="tools")
    spec = tool.get("function")
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(f"{where}.function must be an object", param="tools")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.'",
                                  param="tools")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(f"{where}.function.description must be a string", param="tools")
    parameters = spec.get("parameters")
    schema = NO_PARAMETERS if parameters is None else load_schema(parameters, f"{where}.function.parameters", "tools")
    if schema.get("type", "object") != "object":
        raise InvalidRequestError(f"{where}.function.parameters must describe a JSON object", param="tools")
    return Function(name, description, json.dumps(schema))


def _choice(tool_choice: Any, functions: tuple[Function, ...]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if not any(f.name == name for f in functions):
            raise InvalidRequestError(f"tool_choice names function {name!r}, which is not in tools",
                                      param="tool_choice")
        return "function", name
    raise InvalidRequestError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def parse_tools(body: Mapping[str, Any]) -> ToolRequest | None:
    """The request's ToolRequest, or None when it offers no tools or says tool_choice "none"."""
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise InvalidRequestError(f"{legacy} is the deprecated form of tools: send tools and tool_choice",
                                      param=legacy)
    tools = body.get("tools")
    parallel = body.get("parallel_tool_calls")  # a boolean (the request's schema checked it)
    if not tools:
        if body.get("tool_choice") not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of function tools", param="tools")
    functions = tuple(_function(tool, i) for i, tool in enumerate(tools))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools must have distinct function names", param="tools")
    choice, forced_name = _choice(body.get("tool_choice"), functions)
    if choice == "none":
        return None
    return ToolRequest(functions, choice, forced_name, parallel is not False)

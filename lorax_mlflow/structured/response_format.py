"""Parse and validate a request's ``response_format`` (OpenAI and LoRAX shapes) into a ResponseFormat."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import xgrammar as xgr
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from lorax_mlflow.errors import InvalidRequestError

PARAM = "response_format"
FORMAT_TYPES = ("text", "json_object", "json_schema")
FREE_JSON_OBJECT_SCHEMA = {"type": "object"}
MAX_SCHEMA_DEPTH = 64
"""Deepest nesting of objects/arrays a schema may have: validators and grammar compilers recurse over it."""


@dataclass(frozen=True)
class ResponseFormat:
    """A constraint on the generated text: any JSON object, or JSON that validates against `schema`.

    `strict` follows OpenAI's flag; it defaults to True here, because the output is guaranteed
    to validate either way and strict matching keeps a model from inventing extra properties.
    """

    type: Literal["json_object", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str | None = None
    strict: bool = True
    param: str = PARAM
    """The request field it came from (`response_format`, `guided_json`, `structured_outputs`)."""
    subject: ClassVar[str] = "the JSON schema"

    @property
    def cache_key(self) -> str:
        """Canonical text of what the grammar depends on: two requests with equal keys share one grammar."""
        return json.dumps({"schema": self.schema, "strict": self.strict}, sort_keys=True, separators=(",", ":"))

    def compile(self, compiler: xgr.GrammarCompiler) -> xgr.CompiledGrammar:
        """Whitespace between JSON tokens is fixed (", " and ": ", no newlines), so a model cannot
        stall emitting spaces."""
        schema = FREE_JSON_OBJECT_SCHEMA if self.schema is None else dict(self.schema)
        return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=self.schema is not None and self.strict)


def _fail(message: str, param: str = PARAM) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


def load_schema(schema: Any, where: str, param: str = PARAM) -> Mapping[str, Any]:
    """Return `schema` as a checked JSON-schema object (a JSON string holding one is accepted too)."""
    if schema is None:
        raise _fail(f"{where} is required", param)
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise _fail(f"{where} is not valid JSON: {e}", param) from e
    if not isinstance(schema, Mapping):
        raise _fail(f"{where} must be a JSON object, got {type(schema).__name__}", param)
    schema = dict(schema)
    if _nesting_depth(schema) > MAX_SCHEMA_DEPTH:
        raise _fail(f"{where} is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        validator_for(schema).check_schema(schema)
    except RecursionError as e:
        raise _fail(f"{where} is nested too deeply") from e
    except SchemaError as e:
        location = "/".join(str(part) for part in e.path) or "(root)"
        raise _fail(f"{where} is not a valid JSON schema at {location}: {e.message}", param) from e
    return schema


def _nesting_depth(value: Any) -> int:
    """How deeply dicts and lists nest in `value` (iteratively: the value may be hostile)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_SCHEMA_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_json_schema(spec: Any) -> ResponseFormat:
    if not isinstance(spec, Mapping):
        raise _fail("json_schema must be an object with a 'schema' field")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail("json_schema.name must be a string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _fail("json_schema.strict must be a boolean")
    schema = load_schema(spec.get("schema"), "json_schema.schema")
    return ResponseFormat("json_schema", schema, name=name, strict=strict is not False)


def parse_response_format(response_format: Mapping[str, Any] | None) -> ResponseFormat | None:
    """Turn a request's ``response_format`` into a ResponseFormat, or None for plain text.

    Accepted shapes: ``{"type": "text"}``, ``{"type": "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` (OpenAI) and
    ``{"type": "json_object", "schema": {...}}`` (LoRAX). Anything else, or a schema that is not
    a valid JSON schema, raises InvalidRequestError(param="response_format").
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise _fail(f"must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind not in FORMAT_TYPES:
        raise _fail(f"type must be one of {', '.join(map(repr, FORMAT_TYPES))}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_schema":
        return _parse_json_schema(response_format.get("json_schema"))
    if response_format.get("schema") is None:
        return ResponseFormat("json_object")
    return ResponseFormat("json_object", load_schema(response_format["schema"], "schema"))

"""A request's structured-output fields -> at most one Constraint.

Accepted (chat, completions, /generate): OpenAI's `response_format`; vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` (EBNF, xgrammar syntax with start rule `root`);
and vLLM's newer `structured_outputs: {json | regex | choice | grammar | json_object}`. A request
naming two of them is a 400: which one should win is not ours to guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.structured.constraints import ChoiceConstraint, Constraint, GrammarConstraint, RegexConstraint
from lorax_mlflow.structured.response_format import ResponseFormat, load_schema, parse_response_format

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_BACKENDS = (None, "auto", "xgrammar")


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{param} must be a non-empty string", param=param)
    return value


def _choices(value: Any, param: str) -> ChoiceConstraint:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings", param=param)
    return ChoiceConstraint(tuple(value), param=param)


def _constraint(kind: str, value: Any, param: str) -> Constraint:
    if kind == "json":
        return ResponseFormat("json_schema", load_schema(value, "the schema", param), param=param)
    if kind == "json_object":
        if value is not True:
            raise InvalidRequestError(f"{param} must be true when given", param=param)
        return ResponseFormat("json_object", param=param)
    if kind == "regex":
        return RegexConstraint(_string(value, param), param=param)
    if kind == "choice":
        return _choices(value, param)
    return GrammarConstraint(_string(value, param), param=param)


def _structured_outputs(value: Any) -> Constraint:
    param = "structured_outputs"
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    unknown = sorted(set(given) - set(STRUCTURED_OUTPUTS_KEYS))
    if unknown:
        raise InvalidRequestError(
            f"{param}.{unknown[0]} is not supported (use one of {', '.join(STRUCTURED_OUTPUTS_KEYS)})",
            param=f"{param}.{unknown[0]}",
        )
    if len(given) != 1:
        raise InvalidRequestError(f"{param} must set exactly one of {', '.join(STRUCTURED_OUTPUTS_KEYS)}", param=param)
    ((kind, spec),) = given.items()
    return _constraint(kind, spec, f"{param}.{kind}")


def parse_structured_output(body: Mapping[str, Any]) -> Constraint | None:
    """The one constraint a request asks for (None: free text); raises InvalidRequestError naming
    the field when a field is malformed, or when two fields ask for constraints."""
    backend = body.get("guided_decoding_backend")
    if backend not in _BACKENDS:
        raise InvalidRequestError("guided_decoding_backend: only xgrammar is available here",
                                  param="guided_decoding_backend")
    found: list[tuple[str, Constraint]] = []
    if body.get("response_format") is not None:
        fmt = parse_response_format(body["response_format"])
        if fmt is not None:
            found.append(("response_format", fmt))
    for field in GUIDED_FIELDS:
        if body.get(field) is not None:
            found.append((field, _constraint(field.removeprefix("guided_"), body[field], field)))
    if body.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured_outputs(body["structured_outputs"])))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise InvalidRequestError(f"only one structured-output field may be given, got {names}", param=found[1][0])
    return found[0][1] if found else None

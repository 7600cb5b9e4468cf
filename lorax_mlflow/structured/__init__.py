"""Structured output: request parsing (JSON, regex, choice, EBNF grammar, structural tags), grammar
matchers, logit masks."""

from lorax_mlflow.structured.bitmask import allocate_token_bitmask, apply_token_bitmask_
from lorax_mlflow.structured.constraints import (
    ChoiceConstraint,
    Constraint,
    GrammarConstraint,
    RegexConstraint,
    StructuralTagConstraint,
)
from lorax_mlflow.structured.grammar import GrammarCache, RequestGrammar, TokenRejectedError
from lorax_mlflow.structured.request import parse_structured_output
from lorax_mlflow.structured.response_format import ResponseFormat, parse_response_format

__all__ = [
    "ChoiceConstraint",
    "Constraint",
    "GrammarCache",
    "GrammarConstraint",
    "RegexConstraint",
    "RequestGrammar",
    "ResponseFormat",
    "StructuralTagConstraint",
    "TokenRejectedError",
    "allocate_token_bitmask",
    "apply_token_bitmask_",
    "parse_response_format",
    "parse_structured_output",
]

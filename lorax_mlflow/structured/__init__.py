"""Guaranteed-JSON output (``response_format``): request parsing, grammar matchers, logit masks."""

from lorax_mlflow.structured.bitmask import allocate_token_bitmask, apply_token_bitmask_
from lorax_mlflow.structured.grammar import GrammarCache, RequestGrammar, TokenRejectedError
from lorax_mlflow.structured.response_format import ResponseFormat, parse_response_format

__all__ = [
    "GrammarCache",
    "RequestGrammar",
    "ResponseFormat",
    "TokenRejectedError",
    "allocate_token_bitmask",
    "apply_token_bitmask_",
    "parse_response_format",
]

"""Constraints on generated text beyond JSON: a regex, a choice of strings, an EBNF grammar, a structural tag.

Each constraint is a frozen (picklable) value with the request field it came from (`param`, for
error messages), a `cache_key` (two requests with equal keys share one compiled grammar) and
`compile(compiler)`. :class:`~lorax_mlflow.structured.response_format.ResponseFormat` is the JSON one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import xgrammar as xgr


class Constraint(Protocol):
    """What the grammar cache compiles: any of the constraint classes below, or a ResponseFormat."""

    param: str
    subject: ClassVar[str]
    """What the request wrote, for "<param>: <subject> is not supported: ..." errors."""

    @property
    def cache_key(self) -> str: ...

    def compile(self, compiler: xgr.GrammarCompiler) -> xgr.CompiledGrammar: ...


def _key(kind: str, value: Any) -> str:
    return json.dumps({"kind": kind, "value": value}, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class RegexConstraint:
    """The whole output matches `pattern` (xgrammar's regex dialect: ECMAScript-like, anchored)."""

    pattern: str
    param: str = "guided_regex"

    subject: ClassVar[str] = "the regex"

    @property
    def cache_key(self) -> str:
        return _key("regex", self.pattern)

    def compile(self, compiler: xgr.GrammarCompiler) -> xgr.CompiledGrammar:
        return compiler.compile_regex(self.pattern)


def ebnf_literal(text: str) -> str:
    """`text` as an EBNF string literal (JSON escapes, which xgrammar's EBNF reads)."""
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True)
class ChoiceConstraint:
    """The whole output is exactly one of `choices`."""

    choices: tuple[str, ...]
    param: str = "guided_choice"

    subject: ClassVar[str] = "the choices"

    @property
    def cache_key(self) -> str:
        return _key("choice", sorted(self.choices))

    def compile(self, compiler: xgr.GrammarCompiler) -> xgr.CompiledGrammar:
        return compiler.compile_grammar("root ::= " + " | ".join(ebnf_literal(c) for c in self.choices))


@dataclass(frozen=True)
class GrammarConstraint:
    """The output is a sentence of an EBNF grammar (xgrammar / GBNF syntax, start rule `root`)."""

    ebnf: str
    param: str = "guided_grammar"

    subject: ClassVar[str] = "the grammar"

    @property
    def cache_key(self) -> str:
        return _key("grammar", self.ebnf)

    def compile(self, compiler: xgr.GrammarCompiler) -> xgr.CompiledGrammar:
        return compiler.compile_grammar(self.ebnf)


@dataclass(frozen=True)
class StructuralTagConstraint:
    """An xgrammar structural tag (canonical JSON text): tagged sections whose content follows a
    schema or grammar, e.g. tool calls. Built by the tools package, never taken from a request."""

    tag: str
    param: str = "tools"

    subject: ClassVar[str] = "the tool schemas"

    @property
    def cache_key(self) -> str:
        return _key("structural_tag", self.tag)

    def compile(self, compiler: xgr.GrammarCompiler) -> xgr.CompiledGrammar:
        return compiler.compile_structural_tag(self.tag)


def json_grammar_ebnf(schema: dict[str, Any]) -> str:
    """EBNF text of `schema` with the fixed whitespace of our JSON grammars (", " and ": "), for
    embedding JSON in a larger grammar or structural tag."""
    return str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))

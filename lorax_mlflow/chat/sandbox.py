"""Rendering untrusted chat templates (from a request, a hub adapter) with a time and a size budget.

Jinja's sandbox stops templates from reaching Python internals, but not from spending the
server's time and memory: nested loops ran for seconds and ``{{'a'*30000000}}`` took 32 s and
2.4 GB. Here, on top of the same sandbox and helpers transformers gives chat templates:

- time: while a template renders, a trace function checks a deadline on every line of the
  compiled template code (only template frames are traced), so no loop, macro recursion or
  filter chain runs past the budget;
- size: every operation that can make a large value in one step is checked before it runs
  (``*``, ``**``, ``%``, string padding / width arguments, format specs) or right after (``+``,
  ``~``, filter and method results, namespace assignments), and so is the rendered output, so
  no value grows past the output budget (times two, for the one step that crosses it).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_MAX_SECONDS = 2.0
DEFAULT_MAX_CHARS = 4 << 20
_TEMPLATE_FILENAME = "<template>"
_BIG_NUMBER = re.compile(r"\d{7,}")
_STAR_WIDTH = re.compile(r"%[-+ #0]*\*")


class TemplateBudgetError(jinja2.exceptions.TemplateError):
    """A template ran past its time budget or built a value past its size budget."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


class _BudgetedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a size-checked join instead of jinja's unchecked ``str_join``."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): rendered as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (sandboxed, trim_blocks, tojson, raise_exception,
    strftime_now, namespace, dict) with every value-growing operation checked against `max_chars`."""

    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.max_chars = max_chars
        self.filters["tojson"] = _tojson
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                            namespace=self._namespace_class())
        self.filters = {name: self._checked(name, function) for name, function in self.filters.items()}

    # --- checks -----------------------------------------------------------------------------------
    def _check(self, value: Any) -> Any:
        if _size(value) > self.max_chars:
            raise TemplateBudgetError(f"the chat template built a value longer than {self.max_chars} characters")
        return value

    def _check_arguments(self, args: tuple, kwargs: Mapping[str, Any]) -> None:
        """Integer arguments (widths, counts) above the budget would allocate past it: refused."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.max_chars:
                raise TemplateBudgetError(f"the chat template passed {value}, above the size budget")

    @staticmethod
    def _check_format(spec: Any) -> None:
        """A format string whose width or precision is above the budget (or taken from an argument)."""
        if isinstance(spec, str) and (_BIG_NUMBER.search(spec) or _STAR_WIDTH.search(spec)):
            raise TemplateBudgetError("the chat template used a format width above the size budget")

    def _checked(self, name: str, function: Callable) -> Callable:
        @wraps(function)  # keeps jinja's pass_context / pass_environment markers
        def checked(*args: Any, **kwargs: Any) -> Any:
            values = [arg for arg in args if not isinstance(arg, (jinja2.runtime.Context, jinja2.Environment,
                                                                 jinja2.nodes.EvalContext))]
            if name == "format" and values:
                self._check_format(values[0])
            self._check_arguments(tuple(values[1:]), kwargs)
            return self._check(function(*args, **kwargs))

        return checked

    def checked_concat(self, parts: tuple) -> str:
        texts = [str(part) for part in parts]
        if sum(map(len, texts)) > self.max_chars:
            raise TemplateBudgetError(f"the chat template built a string longer than {self.max_chars} characters")
        return "".join(texts)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if _size(sequence) and isinstance(times, int) and _size(sequence) * times > self.max_chars:
                    raise TemplateBudgetError(f"the chat template repeated a value past {self.max_chars} characters")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
                raise TemplateBudgetError("the chat template raised a number to a power above the budget")
        elif operator == "%":
            self._check_format(left)
        return self._check(super().call_binop(context, operator, left, right))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._check_arguments(args, kwargs)
        return __self._check(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """`"...".format` is reached through here (also without `call`): its spec is checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self._check_format(value.__self__)
        return wrapped

    def _namespace_class(self) -> type:
        check = self._check

        class TemplateNamespace(jinja2.utils.Namespace):
            """transformers' namespace (no underscore names), with assignments size-checked."""

            def __init__(*args: Any, **kwargs: Any) -> None:
                self_, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for name in attrs:
                    _check_name(name)
                jinja2.utils.Namespace.__init__(self_, attrs)

            def __setitem__(self, name: str, value: Any) -> None:
                _check_name(name)
                jinja2.utils.Namespace.__setitem__(self, name, check(value))

        return TemplateNamespace

    # --- rendering --------------------------------------------------------------------------------
    def render(self, template: jinja2.Template, variables: Mapping[str, Any], max_seconds: float) -> str:
        """Render with the time budget (checked on every template line) and the output size budget."""
        deadline = time.monotonic() + max_seconds

        def on_line(frame: Any, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise TemplateBudgetError(f"the chat template took longer than {max_seconds:g} s to render")
            return on_line

        def on_call(frame: Any, event: str, arg: Any) -> Any:
            return on_line if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

        chunks: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(on_call)
        try:
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > self.max_chars:
                    raise TemplateBudgetError(f"the rendered prompt is longer than {self.max_chars} characters")
                chunks.append(chunk)
        finally:
            sys.settrace(previous)
        return "".join(chunks)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=64)
def compile_template(source: str, max_chars: int = DEFAULT_MAX_CHARS) -> jinja2.Template:
    """The compiled template (cached by source): one budgeted environment per template, as transformers does."""
    return BudgetedSandbox(max_chars).from_string(source)

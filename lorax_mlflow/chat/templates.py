"""Chat-template resolution and rendering: the adapter's own template > the base model's > error.

Every template (the base model's, an adapter's from the hub, a request's) renders in the
budgeted sandbox of `lorax_mlflow.chat.sandbox`; a request may bring its own template only
when the operator allows it (`trust_request_chat_template`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lorax_mlflow.adapters.confined import ConfinedFolder
from lorax_mlflow.chat.sandbox import DEFAULT_MAX_SECONDS, compile_template
from lorax_mlflow.errors import InvalidRequestError, require_valid_text
from lorax_mlflow.tools.prompt import fallback_messages, native_messages, renders_hermes_tools
from lorax_mlflow.tools.spec import ToolRequest

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in _TOKENIZER_FILES)


class ChatTemplates:
    """Renders messages to prompt token ids with the right tokenizer for an adapter."""

    def __init__(
        self,
        base_tokenizer: PreTrainedTokenizerBase,
        *,
        trust_request_templates: bool = False,
        max_render_seconds: float = DEFAULT_MAX_SECONDS,
    ) -> None:
        self.base = base_tokenizer
        self.trust_request_templates = trust_request_templates
        self.max_render_seconds = max_render_seconds
        self._adapter_tokenizers: dict[Path, PreTrainedTokenizerBase | None] = {}
        self._lock = threading.Lock()

    def tokenizer_for(self, adapter_folder: Path | None) -> PreTrainedTokenizerBase:
        """The adapter's own tokenizer when its folder ships one with a chat template, else the base one."""
        if adapter_folder is None:
            return self.base
        with self._lock:
            if adapter_folder not in self._adapter_tokenizers:
                tokenizer = None
                if _has_tokenizer(adapter_folder):
                    ConfinedFolder(adapter_folder).check_entries()  # no tokenizer file may point elsewhere
                    tokenizer = AutoTokenizer.from_pretrained(adapter_folder)
                    if not tokenizer.chat_template:
                        tokenizer = None
                    else:
                        logger.info("using the chat template shipped with adapter %s", adapter_folder)
                self._adapter_tokenizers[adapter_folder] = tokenizer
            return self._adapter_tokenizers[adapter_folder] or self.base

    def render(
        self,
        messages: list[dict[str, Any]],
        adapter_folder: Path | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: ToolRequest | None = None,
    ) -> list[int]:
        """Prompt token ids. `tools` (and tool turns in the history) go through the template when it
        renders Hermes tool calls itself, else through the fallback format of tools/prompt.py."""
        if chat_template is not None and not self.trust_request_templates:
            raise InvalidRequestError(
                "chat_template: this server does not accept per-request chat templates (the operator can "
                "allow them with --trust-request-chat-template)", param="chat_template",
            )
        tokenizer = self.tokenizer_for(adapter_folder)
        template = chat_template or tokenizer.chat_template
        if isinstance(template, dict):  # tokenizers with several named templates: the default one
            template = template.get("default")
        if not template:
            raise InvalidRequestError(
                "model has no chat template: pass `chat_template`, or use the completions API", param="messages"
            )
        normalized = [normalize_message(m, i) for i, m in enumerate(messages)]
        if not normalized:
            raise InvalidRequestError("messages must not be empty", param="messages")
        kwargs = dict(chat_template_kwargs or {})
        if renders_hermes_tools(template):
            normalized = native_messages(normalized)
            if tools is not None:
                kwargs["tools"] = [f.to_openai() for f in tools.functions]
        else:
            normalized = fallback_messages(normalized, tools)
        # The variables transformers' apply_chat_template gives a template, rendered in the budgeted sandbox.
        variables = {**tokenizer.special_tokens_map, **kwargs, "messages": normalized, "tools": kwargs.get("tools"),
                     "documents": None, "add_generation_prompt": bool(add_generation_prompt)}
        try:
            compiled = compile_template(template)
            rendered = compiled.environment.render(compiled, variables, self.max_render_seconds)
        except Exception as error:  # a broken or over-budget template fails this request only (RecursionError too)
            param = "chat_template" if chat_template is not None else "messages"
            raise InvalidRequestError(f"chat template failed to render: {type(error).__name__}: {error}",
                                      param=param) from error
        # The template already wrote the special tokens it wants (e.g. <|im_start|>).
        return tokenizer.encode(rendered, add_special_tokens=False)


def _text(content: list[Any], index: int) -> str:
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequestError(f"messages[{index}].content[{j}] must be a content part object",
                                      param="messages")
        if part["type"] != "text":
            raise InvalidRequestError(
                f"messages[{index}].content[{j}] is of type {part['type']!r}: this model accepts text only",
                param="messages",
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"messages[{index}].content[{j}].text must be a string", param="messages")
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidRequestError(f"{where} must be a list", param="messages")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(f"{where}[{j}] must be {{'type': 'function', 'function': {{'name', "
                                      "'arguments'}}}", param="messages")
        if not isinstance(function.get("arguments", ""), (str, dict)):
            raise InvalidRequestError(f"{where}[{j}].function.arguments must be a JSON string", param="messages")
    return calls


def normalize_message(message: dict[str, Any], index: int) -> dict[str, Any]:
    """One OpenAI message as the template sees it: text content (parts joined; other parts are a
    400), tool calls on assistant turns, the call id on tool turns; `developer` is read as
    `system`. Field types and roles were checked by the request's schema (api/schemas.py)."""
    role = message["role"]
    content = message.get("content")
    if isinstance(content, list):
        content = _text(content, index)
    elif content is None:
        if role not in ("assistant", "tool"):
            raise InvalidRequestError(f"messages[{index}].content must be a string or text parts", param="messages")
        content = ""
    normalized: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                  "content": require_valid_text(content, f"messages[{index}].content")}
    if message.get("name"):
        normalized["name"] = require_valid_text(message["name"], f"messages[{index}].name")
    if role == "assistant" and message.get("tool_calls"):
        normalized["tool_calls"] = _tool_calls(message["tool_calls"], index)
    if role == "tool" and message.get("tool_call_id") is not None:
        normalized["tool_call_id"] = message["tool_call_id"]
    return normalized

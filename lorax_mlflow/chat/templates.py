"""Chat-template resolution and rendering: the adapter's own template > the base model's > error."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lorax_mlflow.errors import InvalidRequestError

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_ROLES = {"system", "user", "assistant", "tool", "developer"}


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in _TOKENIZER_FILES)


class ChatTemplates:
    """Renders messages to prompt token ids with the right tokenizer for an adapter."""

    def __init__(self, base_tokenizer: PreTrainedTokenizerBase) -> None:
        self.base = base_tokenizer
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
    ) -> list[int]:
        tokenizer = self.tokenizer_for(adapter_folder)
        template = chat_template or tokenizer.chat_template
        if not template:
            raise InvalidRequestError(
                "model has no chat template: pass `chat_template`, or use the completions API", param="messages"
            )
        normalized = [normalize_message(m, i) for i, m in enumerate(messages)]
        if not normalized:
            raise InvalidRequestError("messages must not be empty", param="messages")
        try:
            rendered = tokenizer.apply_chat_template(
                normalized,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **(chat_template_kwargs or {}),
            )
        except Exception as error:  # a Jinja error in a user-supplied template is the caller's mistake
            raise InvalidRequestError(f"chat template failed to render: {error}", param="chat_template") from error
        # The template already wrote the special tokens it wants (e.g. <|im_start|>).
        return tokenizer.encode(rendered, add_special_tokens=False)


def normalize_message(message: Any, index: int) -> dict[str, Any]:
    """Check one OpenAI message and flatten list-of-text-parts content to a string."""
    if not isinstance(message, dict):
        raise InvalidRequestError(f"messages[{index}] must be an object", param="messages")
    role = message.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(
            f"messages[{index}].role must be one of {sorted(_ROLES)}, got {role!r}", param="messages"
        )
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"messages[{index}].content parts must be text parts ({{'type': 'text', 'text': ...}})",
                    param="messages",
                )
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None and role == "assistant":
        content = ""
    elif not isinstance(content, str):
        raise InvalidRequestError(f"messages[{index}].content must be a string or text parts", param="messages")
    normalized = {"role": "system" if role == "developer" else role, "content": content}
    if message.get("name"):
        normalized["name"] = message["name"]
    return normalized

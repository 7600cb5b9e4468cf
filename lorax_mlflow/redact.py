"""Secrets never leave the process: `api_token`, `Authorization`, AWS keys and hub tokens are
replaced by a marker before a request reaches a trace, a log line or an error message."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[REDACTED]"
SECRET_KEYS = frozenset({
    "api_token", "api_key", "authorization", "proxy_authorization", "token", "hf_token", "access_token",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "x_api_key",
})
_SECRET_TEXT = re.compile(
    r"(?P<scheme>(?i:bearer|basic)\s+)[^\s'\",]+"  # Authorization: Bearer <token>
    r"|(?P<field>(?i:aws_secret_access_key|aws_session_token|api_token|hf_token)[\"']?\s*[:=]\s*[\"']?)[^\s'\",}]+"
    r"|\bhf_[A-Za-z0-9]{8,}"  # Hugging Face tokens
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
)


def _is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in SECRET_KEYS


def redact(value: Any) -> Any:
    """A copy of `value` (dicts, lists, strings) with secret fields and secret-looking text replaced."""
    if isinstance(value, Mapping):
        return {key: REDACTED if _is_secret_key(key) and item else redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    return _SECRET_TEXT.sub(lambda match: (match.group("scheme") or match.group("field") or "") + REDACTED, text)


class RedactingFilter(logging.Filter):
    """A logging filter (for handlers) that redacts secrets from the message, its arguments and the traceback.

    String arguments are redacted one by one, so formatters that read ``record.args`` themselves
    (uvicorn's access log unpacks client, method, path, version, status) keep working; a secret
    that only appears once the message is formatted makes the record a plain redacted string.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_text(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_text(arg) if isinstance(arg, str) else arg for arg in record.args)
        elif isinstance(record.args, Mapping):
            record.args = redact(record.args)
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and record.exc_info[1] is not None:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact_text(formatted)
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a RedactingFilter to every handler of `logger` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging config with a RedactingFilter on each of its handlers: its access lines
    (request paths with their query strings) and its error lines ("Exception in ASGI application"
    and the traceback) are redacted like the application's logs. Pass it as ``log_config``."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_secrets"] = {"()": RedactingFilter}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "redact_secrets"]
    return config

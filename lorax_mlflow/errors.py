"""Errors that fail one request with a clear message, never the engine.

Every surface maps these to its own shape: the OpenAI routes to
``{"error": {"message", "type", "param", "code"}}`` with ``status``, the LoRAX
routes to ``{"error", "error_type"}``, MLflow to an ``MlflowException``.
"""

from __future__ import annotations

from lorax_mlflow.redact import redact_text


class LoraxError(Exception):
    """Base class: a request-level failure with an HTTP status and OpenAI error fields."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        message = redact_text(message)  # an error message never carries a secret to a client or a log
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(LoraxError):
    """A parameter is out of range, malformed, or cannot be honoured."""


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AdapterNotFoundError(LoraxError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class AdapterValidationError(LoraxError):
    """The adapter exists but cannot be used with this base model or engine config."""

    code = "invalid_adapter"


class AdapterAuthError(LoraxError):
    status = 401
    type = "authentication_error"
    code = "adapter_unauthorized"


class AdapterForbiddenError(AdapterAuthError):
    status = 403
    type = "permission_error"
    code = "adapter_forbidden"


class EngineStepError(LoraxError):
    """An engine step failed for this request (its other requests were served): a server-side fault."""

    status = 500
    type = "internal_error"
    code = "internal_error"


class EngineUnavailableError(LoraxError):
    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"


def require_valid_text(text: str, param: str) -> str:
    """`text` if it is valid Unicode; a lone surrogate (``"\\ud800"`` is legal JSON) is a 400 naming `param`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(
            f"{param} contains an unpaired surrogate (\\u{ord(text[error.start]):04x} at {error.start}): "
            "it is not valid Unicode text", param=param,
        ) from error
    return text


def error_from_fields(
    kind: str, message: str, *, param: str | None, code: str | None, status: int, type_: str
) -> LoraxError:
    """Rebuild an error that crossed a process boundary as data: the same class when it is one of
    these, else a LoraxError carrying the same status, type and code."""
    known = {cls.__name__: cls for cls in _subclasses(LoraxError)}
    try:
        error = known.get(kind, LoraxError)(message, param=param, code=code)
    except TypeError:  # a subclass with its own constructor
        error = LoraxError(message, param=param, code=code)
    if error.status != status or error.type != type_:
        error.status, error.type = status, type_
    return error


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found

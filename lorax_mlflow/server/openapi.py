"""What the OpenAPI document says each route answers: the real 200 bodies (JSON, or server-sent
events when streaming), and the error objects of each route family for every 4xx/5xx the route
can give. FastAPI's default 422 is removed: request validation failures are 400s here.

These models document the responses (and let schemathesis check them); the routes build their
bodies in the formatters, so the models stay permissive where the formatters add optional fields.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


class _Doc(BaseModel):
    """Response documentation: extra fields are allowed."""


# --- errors -----------------------------------------------------------------------------------------
class OpenAIError(_Doc):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(_Doc):
    error: OpenAIError


class LoraxErrorResponse(_Doc):
    error: str
    error_type: str


class MlflowErrorResponse(_Doc):
    error_code: str
    message: str


# --- OpenAI bodies ------------------------------------------------------------------------------------
class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Doc):
    role: str
    content: str | None


class ChatChoice(_Doc):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class ChatCompletion(_Doc):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Doc):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class Completion(_Doc):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Doc):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(_Doc):
    object: str
    data: list[ModelCard]


# --- LoRAX and MLflow bodies ---------------------------------------------------------------------------
class GenerateResponse(_Doc):
    generated_text: str
    details: dict[str, Any] | None = None


class Health(_Doc):
    status: str


SSE = "text/event-stream"
SSE_EVENT_SCHEMA = {
    "type": "object",
    "description": "one server-sent event: `data:` is a JSON chunk (or an error object), the last one `[DONE]`",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
_ERROR_STATUSES = {400: "invalid request", 401: "private adapter: no token", 403: "private adapter: token refused",
                   404: "unknown model or adapter", 413: "request body too large",
                   500: "the engine failed on this request (other requests are unaffected)", 503: "model not loaded yet"}


def errors(model: type[BaseModel], *extra: int) -> dict[int | str, dict[str, Any]]:
    """The error responses of a route family (OpenAI, LoRAX or MLflow shape)."""
    statuses = {**_ERROR_STATUSES, **{status: "error" for status in extra}}
    return {status: {"model": model, "description": text} for status, text in sorted(statuses.items())}


def ok(model: type[BaseModel] | Any, *, streams: bool = False) -> dict[int | str, dict[str, Any]]:
    """The 200 response: `model` as JSON, and server-sent events when the request asks to stream."""
    response: dict[str, Any] = {"model": model, "description": "the response"}
    if streams:
        response["description"] = "the response (JSON), or server-sent events when the request sets stream"
        response["content"] = {SSE: {"schema": SSE_EVENT_SCHEMA}}
    return {200: response}


def drop_fastapi_422(app: FastAPI) -> None:
    """Remove FastAPI's automatic 422 responses (and their schemas) from the generated document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    if isinstance(operation, dict):
                        operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

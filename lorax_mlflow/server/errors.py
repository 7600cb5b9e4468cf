"""Error responses: OpenAI's shape on the OpenAI routes, LoRAX's on /generate*, MLflow's on /invocations.

FastAPI's own 422 shape never reaches a client: request validation failures (including malformed
JSON) become 400s in the route family's shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorax_mlflow.api.schemas import invalid_request
from lorax_mlflow.errors import InvalidRequestError, LoraxError
from lorax_mlflow.redact import redact_text

logger = logging.getLogger(__name__)

LORAX_ROUTES = ("/", "/generate", "/generate_stream")
_LORAX_ERROR_TYPES = {400: "validation", 401: "authentication", 403: "authentication", 404: "not_found",
                      503: "unavailable"}


class HTTPStatusError(LoraxError):
    """An HTTP-level failure (unknown route, wrong method, internal error) in the routes' error shapes."""

    def __init__(self, message: str, *, status: int, type_: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.type = type_


def lorax_error_body(error: LoraxError) -> dict[str, str]:
    """LoRAX's `{"error", "error_type"}`; lorax-client maps error_type "validation" to its ValidationError."""
    return {"error": error.message, "error_type": _LORAX_ERROR_TYPES.get(error.status, "generation")}


def mlflow_error_body(error: LoraxError) -> dict[str, str]:
    code = {404: "RESOURCE_DOES_NOT_EXIST", 503: "TEMPORARILY_UNAVAILABLE"}.get(error.status, "INVALID_PARAMETER_VALUE")
    return {"error_code": code, "message": error.message}


def log_client_error(route: str, status: int, param: str | None, message: str) -> None:
    """One INFO line per 4xx: route, status, parameter, message. Messages name parameters and
    limits, never the prompt or a token."""
    if 400 <= status < 500:
        logger.info("%s -> %d param=%s: %s", route, status, param or "-", message)


def error_response(request: Request, error: LoraxError) -> JSONResponse:
    path = request.url.path
    log_client_error(f"{request.method} {path}", error.status, error.param, error.message)
    if path in LORAX_ROUTES:
        body: dict[str, Any] = lorax_error_body(error)
    elif path == "/invocations":
        body = mlflow_error_body(error)
    else:
        body = error.to_openai()
    return JSONResponse(body, status_code=error.status)


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """FastAPI's parse failure as the 400 every surface answers for the same body."""
    return invalid_request(list(exc.errors()))


def http_error(exc: StarletteHTTPException) -> HTTPStatusError:
    """An HTTP-level failure (unknown route, wrong method, body too large) as a LoraxError."""
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return HTTPStatusError(str(exc.detail), status=exc.status_code,
                           type_="not_found_error" if exc.status_code == 404 else "invalid_request_error",
                           code=codes.get(exc.status_code))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraxError)
    async def on_lorax_error(request: Request, exc: LoraxError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, http_error(exc))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error on %s: %s", request.url.path, redact_text(f"{type(exc).__name__}: {exc}"),
                     exc_info=exc)
        error = HTTPStatusError(f"internal server error: {type(exc).__name__}", status=500, type_="internal_error",
                                code="internal_error")
        return error_response(request, error)

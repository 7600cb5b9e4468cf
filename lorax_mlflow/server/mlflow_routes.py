"""/invocations: the body `mlflow models serve` takes for this ChatModel, answered by the same pyfunc model."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException
from mlflow.types.llm import ChatParams

from lorax_mlflow.client.cancel_scope import CancelScope
from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.server.common import ClientDisconnectedError, off_loop, unless_disconnected
from lorax_mlflow.server.errors import HTTPStatusError, log_client_error
from lorax_mlflow.server.metrics import ServerMetrics
from lorax_mlflow.server.model_source import ModelHolder
from lorax_mlflow.server.openapi import ChatCompletion, MlflowErrorResponse, errors, ok

_INVOCATIONS_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {"type": "array", "items": {"type": "object", "properties": {
                "role": {"type": "string"}, "content": {"type": "string"}}}},
            "max_tokens": {"type": "integer"},
            "temperature": {"type": "number"},
            "custom_inputs": {"type": "object"},
        },
    }}},
}


logger = logging.getLogger(__name__)
CHAT_PARAMS_FIELDS = frozenset(f.name for f in dataclasses.fields(ChatParams))


def chat_model_input(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped body as the ChatModel input: MLflow's ChatParams drops fields it does not
    know, so every other field (tool_choice, response_format, seed, ...) moves into
    `custom_inputs`, and `model` becomes `custom_inputs.adapter_id`, selecting the adapter as on /v1.
    `tools` moves too: MLflow's schema for them rejects most of JSON Schema (maxLength, minimum,
    nested objects). When `custom_inputs` sets a field too, `custom_inputs` wins (it is the
    MLflow-native place)."""
    lifted = {k: v for k, v in body.items()
              if (k not in CHAT_PARAMS_FIELDS or k == "tools") and k not in ("messages", "custom_inputs")}
    if not lifted:
        return body
    if "model" in lifted:
        lifted["adapter_id"] = lifted.pop("model")
    custom = body.get("custom_inputs")
    if custom is not None and not isinstance(custom, dict):
        raise InvalidRequestError("custom_inputs must be an object", param="custom_inputs")
    overridden = sorted(set(lifted) & set(custom or {}))
    if overridden:
        logger.debug("/invocations: custom_inputs wins over top-level %s", ", ".join(overridden))
    kept = {k: v for k, v in body.items() if k not in lifted and k != "model"}
    return {**kept, "custom_inputs": {**lifted, **(custom or {})}}


def _check_chat_request(model_input: dict[str, Any]) -> None:
    """Parse the input as MLflow's ChatCompletionRequest first: the pyfunc wrapper does the same, but
    its ValueErrors (a message without content, a string max_tokens) would surface as 500s."""
    from mlflow.types.llm import ChatCompletionRequest

    try:
        # JSON has one number type: an integer temperature (0, 1) is what OpenAI clients send.
        ChatCompletionRequest.from_dict({k: float(v) if k in _FLOAT_PARAMS and type(v) is int else v
                                         for k, v in model_input.items()})
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise InvalidRequestError(f"invalid chat request: {error}") from error


_FLOAT_PARAMS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")


def mlflow_router(holder: ModelHolder, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(tags=["MLflow"])

    @router.post("/invocations", openapi_extra={"requestBody": _INVOCATIONS_BODY},
                 responses={**ok(ChatCompletion), **errors(MlflowErrorResponse, 500, 501)})
    async def invocations(request: Request):
        """Chat dict `{"messages", ...params, "custom_inputs"}` -> ChatCompletionResponse, as `mlflow models serve`."""
        record = metrics.request("invocations")
        predict = holder.model.predict
        if predict is None:
            record.close(501)
            raise HTTPStatusError("this server was started with a bare LoraxService, not an MLflow model",
                                  status=501, type_="not_implemented")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            record.close(400)
            raise InvalidRequestError(f"malformed JSON in the request body: {error}", code="invalid_json") from error
        except RecursionError as error:
            record.close(400)
            raise InvalidRequestError("the request body is nested too deeply", code="invalid_json") from error
        if not isinstance(body, dict):
            record.close(400)
            raise InvalidRequestError("the request body must be a JSON object with `messages`")
        try:
            model_input = chat_model_input(body)
            _check_chat_request(model_input)
        except InvalidRequestError:
            record.close(400)
            raise
        scope = CancelScope()  # the client leaving aborts what predict started, on its worker thread
        try:
            response = await unless_disconnected(request, off_loop(scope.run, predict, model_input), scope.cancel)
        except ClientDisconnectedError as error:
            record.close(error.status)
            raise
        except MlflowException as error:
            status = error.get_http_status_code()
            record.close(status)
            log_client_error("POST /invocations", status, None, error.message)
            return JSONResponse(json.loads(error.serialize_as_json()), status_code=status)
        record.adapter = response.get("model") or "base"
        record.close(200)
        return response

    return router

"""/invocations: the body `mlflow models serve` takes for this ChatModel, answered by the same ChatModel."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException
from mlflow.types.llm import ChatMessage, ChatParams

from lorax_mlflow.chat_model import LoraxChatModel
from lorax_mlflow.errors import InvalidRequestError
from lorax_mlflow.server.common import off_loop
from lorax_mlflow.server.metrics import ServerMetrics
from lorax_mlflow.server.model_source import ModelHolder


def invoke(chat_model: LoraxChatModel, body: dict[str, Any]) -> dict[str, Any]:
    """The conversion MLflow's ChatModel wrapper applies to a chat dict, then the model's own predict."""
    request = dict(body)
    messages = [ChatMessage.from_dict(message) for message in request.pop("messages", [])]
    params = ChatParams.from_dict(request)
    return chat_model.predict(None, messages, params).to_dict()


def mlflow_router(holder: ModelHolder, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(tags=["MLflow"])

    @router.post("/invocations")
    async def invocations(request: Request):
        """Chat dict `{"messages", ...params, "custom_inputs"}` -> ChatCompletionResponse, as `mlflow models serve`."""
        record = metrics.request("invocations")
        chat_model = holder.model.chat_model
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            record.close(400)
            raise InvalidRequestError(f"malformed JSON in the request body: {error}", code="invalid_json") from error
        if not isinstance(body, dict):
            record.close(400)
            raise InvalidRequestError("the request body must be a JSON object with `messages`")
        try:
            response = await off_loop(invoke, chat_model, body)
        except MlflowException as error:
            record.close(error.get_http_status_code())
            return JSONResponse(json.loads(error.serialize_as_json()), status_code=error.get_http_status_code())
        except (TypeError, ValueError, KeyError) as error:  # MLflow's dataclasses reject malformed fields so
            record.close(400)
            raise InvalidRequestError(f"invalid chat request: {error}") from error
        record.adapter = response.get("model") or "base"
        record.close(200)
        return response

    return router
